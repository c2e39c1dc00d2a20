"""Stub ``torchaudio.functional``: every function raises ``RuntimeError``."""

from __future__ import annotations

from typing import NoReturn


def resample(*args: object, **kwargs: object) -> NoReturn:
    from torchaudio import _unavailable

    _unavailable("functional.resample")
