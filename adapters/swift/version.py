"""The ms-swift releases the adapter is written for (and tested against: 4.6.0)."""

from __future__ import annotations

SUPPORTED_RANGE = ">=4.6,<5"


def is_supported(version: str) -> bool:
    from packaging.version import Version

    return Version("4.6") <= Version(version) < Version("5")
