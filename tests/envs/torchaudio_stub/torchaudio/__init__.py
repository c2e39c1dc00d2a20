"""Stub ``torchaudio`` for vlm-dpo-plugins test environments (see this distribution's pyproject.toml).

It exists only so that ``import torchaudio`` succeeds where a framework imports it at module
level without using it (LLaMA-Factory 0.9.5 ``data/mm_plugin.py``). Every audio entry point
raises ``RuntimeError``.
"""

from __future__ import annotations

from typing import NoReturn

__version__ = "2.14.1+vlmdpostub"
IS_VLM_DPO_STUB = True

_MESSAGE = (
    "torchaudio is a stub in this vlm-dpo-plugins test environment "
    "(tests/envs/torchaudio_stub): audio loading/resampling is unavailable. "
    "Install a real torchaudio matching your torch to use audio data."
)


def _unavailable(name: str) -> NoReturn:
    raise RuntimeError(f"{_MESSAGE} (called torchaudio.{name})")


def load(*args: object, **kwargs: object) -> NoReturn:
    _unavailable("load")


def save(*args: object, **kwargs: object) -> NoReturn:
    _unavailable("save")


def info(*args: object, **kwargs: object) -> NoReturn:
    _unavailable("info")


from torchaudio import functional

__all__ = ["functional", "info", "load", "save"]
