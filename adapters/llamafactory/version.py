"""The LLaMA-Factory releases the adapter is written for (and tested against: 0.9.5)."""

from __future__ import annotations

SUPPORTED_RANGE = ">=0.9.5,<0.10"


def is_supported(version: str) -> bool:
    from packaging.version import Version

    return Version("0.9.5") <= Version(version) < Version("0.10")
