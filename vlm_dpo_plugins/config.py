"""One configuration object for every plugin, loaded from a dict or a YAML file.

The defaults already fix the known failure modes (frozen vision tower and projector,
gradient clipping, non-finite step skipping, non-reentrant checkpointing, fp32
log-probs), so an empty config is a good config. Every key and value is checked:
a typo names the key and the nearest valid one instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlm_dpo_plugins.collation.settings import CollationConfig
from vlm_dpo_plugins.diagnostics.settings import DiagnosticsConfig
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.freeze.settings import FreezeConfig
from vlm_dpo_plugins.guards.settings import GuardsConfig
from vlm_dpo_plugins.losses.settings import LossConfig
from vlm_dpo_plugins.sharing.settings import SharingConfig
from vlm_dpo_plugins.validation import FieldError, nearest


@dataclass
class VLMDPOConfig:
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    collation: CollationConfig = field(default_factory=CollationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    extra: dict[str, Any] = field(default_factory=dict)
    """Sections declared by third-party plugins through ``vlm_dpo_config_sections``, already validated."""

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any] | None, *, extra_sections: Mapping[str, type] | None = None
    ) -> VLMDPOConfig:
        data = dict(data or {})
        extra_sections = dict(extra_sections or {})
        builtin = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        clash = builtin & set(extra_sections)
        if clash:
            raise ConfigError(f"plugin config section(s) {sorted(clash)} clash with built-in sections")
        extras = {}
        for key in [key for key in data if key in extra_sections]:
            extras[key] = _build(extra_sections[key], data.pop(key), key)
        _reject_unknown(data, builtin | set(extra_sections), prefix="")
        sections = {name: _build(_hint(cls, name), value, name) for name, value in data.items()}
        return cls(**sections, extra=extras)

    @classmethod
    def from_yaml(cls, path: str | Path, *, extra_sections: Mapping[str, type] | None = None) -> VLMDPOConfig:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
        return cls.from_dict(data, extra_sections=extra_sections)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _hint(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _reject_unknown(data: Mapping[str, Any], valid: set[str], prefix: str) -> None:
    for key in data:
        if key not in valid:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_suggestion(str(key), valid, prefix)}")


def _suggestion(key: str, valid: set[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys: {', '.join(prefix + name for name in sorted(valid))}"


def _build(hint: Any, value: Any, path: str) -> Any:
    """Convert ``value`` to ``hint`` (dataclass, Literal, Optional, tuple, dict or scalar), or raise naming ``path``."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{path}' must be a mapping of keys, got {value!r}")
        fields = {f.name for f in dataclasses.fields(hint)}
        _reject_unknown(value, fields, prefix=f"{path}.")
        hints = typing.get_type_hints(hint)
        kwargs = {key: _build(hints[key], item, f"{path}.{key}") for key, item in value.items()}
        try:
            return hint(**kwargs)
        except FieldError as error:
            raise ConfigError(f"'{path}.{error.key}' {error.detail}") from None
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"'{path}' is {value!r}; expected one of {list(choices)}{nearest(value, choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _build(option, value, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{path}' must be a list, got {value!r}")
        return tuple(_build(item_hint, item, f"{path}[{index}]") for index, item in enumerate(value))
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{path}' must be a mapping, got {value!r}")
        return {_build(key_hint, k, path): _build(value_hint, v, f"{path}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    return _scalar(hint, value, path)


def _scalar(hint: type, value: Any, path: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-5" as a string; accept what a user plainly meant as a number
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"'{path}' must be {hint.__name__}, got {value!r}")
