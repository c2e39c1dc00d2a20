"""Validation helpers shared by the config sections: errors that name the key and the nearest valid value."""

from __future__ import annotations

import difflib
from typing import Any

from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.shown import shown

PARAMETER_GROUPS = ("vision", "projector", "language", "other")


class FieldError(ConfigError):
    """A bad value found by a section's own validation; the loader adds the section path to ``key``."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"'{key}' {detail}")
        self.key = key
        self.detail = detail


def nearest(value: Any, choices) -> str:
    if not isinstance(value, str) or len(value) > 200:  # str() of a YAML alias bomb would expand it
        return ""
    close = difflib.get_close_matches(value, [str(choice) for choice in choices], n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def require(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise FieldError(key, f"is {shown(value)}; expected {expected}")


def require_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FieldError(key, f"has {shown(value)}; expected one of {list(choices)}{nearest(value, choices)}")
