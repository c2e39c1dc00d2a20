"""Merge suggested values into a user's DeepSpeed config without overriding anything the user chose.

A key counts as the user's choice when it is present with any value other than
``"auto"``. ``"auto"`` is a placeholder the user left for tooling to fill
(transformers fills the bucket keys with ``hidden_size``-based values when it builds
the engine); a suggestion fills it first, with a value that follows the same rule
within the memory ceiling, and the report says ``auto -> value``. DeepSpeed accepts
some ZeRO keys under two spellings (``stage3_prefetch_bucket_size`` and
``prefetch_bucket_size``); either spelling counts as the user's choice.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.errors import ConfigError

AUTO = "auto"

ZERO_KEY_SPELLINGS = {
    "stage3_prefetch_bucket_size": "prefetch_bucket_size",
    "stage3_param_persistence_threshold": "param_persistence_threshold",
    "stage3_model_persistence_threshold": "model_persistence_threshold",
    "stage3_max_live_parameters": "max_live_parameters",
    "stage3_max_reuse_distance": "max_reuse_distance",
}
"""DeepSpeed's alias -> field name pairs in ``zero_optimization`` (pydantic accepts both)."""

_UNSET = object()


@dataclass(frozen=True)
class ConfigChange:
    key: str
    before: Any  # the user's value, "auto", or None when the key was absent
    after: Any

    def __str__(self) -> str:
        before = "unset" if self.before is None else _format(self.before)
        return f"{self.key}: {before} -> {_format(self.after)}"


@dataclass(frozen=True)
class KeptValue:
    """A value the user set explicitly where a different one was suggested."""

    key: str
    value: Any
    suggested: Any

    def __str__(self) -> str:
        return f"{self.key}: kept {_format(self.value)} (suggested {_format(self.suggested)})"


@dataclass
class DeepSpeedConfigMerge:
    config: dict[str, Any]
    changes: list[ConfigChange] = field(default_factory=list)
    kept: list[KeptValue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        """One line for the training log."""
        parts = []
        if self.changes:
            parts.append("set " + "; ".join(str(change) for change in self.changes))
        if self.kept:
            parts.append("user values " + "; ".join(str(kept) for kept in self.kept))
        parts.extend(self.notes)
        return "DeepSpeed config: " + (" | ".join(parts) if parts else "unchanged")


def load_deepspeed_config(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A private deep copy of a DeepSpeed config given as a dict or a JSON file path."""
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    path = Path(source)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"DeepSpeed config file {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config file {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def merge_deepspeed_config(
    user_config: Mapping[str, Any] | str | os.PathLike, suggestions: Mapping[str, Any]
) -> DeepSpeedConfigMerge:
    """Fill ``suggestions`` (dotted keys) into a copy of ``user_config`` where the user left a key unset or "auto"."""
    config = load_deepspeed_config(user_config)
    merge = DeepSpeedConfigMerge(config=config)
    for dotted_key, value in suggestions.items():
        *parents, leaf = dotted_key.split(".")
        section = _section(config, parents, dotted_key)
        spelling, current = _user_entry(section, leaf)
        if current is _UNSET or current == AUTO:
            # Filled under the spelling the user wrote, so DeepSpeed never sees both spellings.
            section[spelling] = value
            merge.changes.append(ConfigChange(dotted_key, None if current is _UNSET else current, value))
        elif current != value:
            merge.kept.append(KeptValue(dotted_key, current, value))
    return merge


def config_value(config: Mapping[str, Any], dotted_key: str, default: Any = None) -> Any:
    """The value at a dotted key (either ZeRO spelling), or ``default`` when any part is missing."""
    *parents, leaf = dotted_key.split(".")
    section: Any = config
    for name in parents:
        if not isinstance(section, Mapping) or name not in section:
            return default
        section = section[name]
    if not isinstance(section, Mapping):
        return default
    _, value = _user_entry(section, leaf)
    return default if value is _UNSET else value


def _section(config: dict[str, Any], parents: list[str], dotted_key: str) -> dict[str, Any]:
    section = config
    for depth, name in enumerate(parents):
        child = section.setdefault(name, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise ConfigError(
                f"DeepSpeed config key '{where}' is {child!r}, not a section; cannot set '{dotted_key}'. "
                f"Write '{where}' as a JSON object."
            )
        section = child
    return section


def _user_entry(section: Mapping[str, Any], leaf: str) -> tuple[str, Any]:
    for spelling in (leaf, ZERO_KEY_SPELLINGS.get(leaf)):
        if spelling is not None and spelling in section:
            return spelling, section[spelling]
    return leaf, _UNSET


def _format(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)
