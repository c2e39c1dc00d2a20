"""One configuration object for every plugin, loaded from a dict or a YAML file, in the sections plugins declare.

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
from pathlib import Path
from typing import Any, Literal

from vlm_dpo_plugins.errors import ConfigError, MissingSection
from vlm_dpo_plugins.shown import shown, shown_path
from vlm_dpo_plugins.validation import FieldError, nearest

SectionTypes = Mapping[str, type]


class VLMDPOConfig:
    """The validated plugin configuration: one section per plugin that declares one (``vlm_dpo_config_sections``).

    Sections are read as attributes (``config.guards.max_grad_norm``). The built-in plugins declare theirs like any
    third-party plugin does, so a blocked plugin's section is simply absent (``section(name)`` is then None).
    """

    def __init__(self, **sections: Any) -> None:
        for name, section in sections.items():
            if not dataclasses.is_dataclass(section) or isinstance(section, type):
                raise ConfigError(f"config section {name!r} must be a dataclass instance, got {shown(section)}")
        object.__setattr__(self, "_sections", dict(sections))

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("_sections", {})
        if name in sections:
            return sections[name]
        if name.startswith("_"):
            raise AttributeError(name)
        raise MissingSection(
            f"the plugin config has no section {name!r}: no loaded plugin declares it (is that plugin blocked with "
            f"VLM_DPO_BLOCK_PLUGINS?); sections: {sorted(sections)}"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("VLMDPOConfig is immutable: use replace(section=...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VLMDPOConfig) and self._sections == other._sections

    def __repr__(self) -> str:
        return f"VLMDPOConfig({', '.join(f'{name}={section!r}' for name, section in self._sections.items())})"

    @property
    def sections(self) -> Mapping[str, Any]:
        return dict(self._sections)

    def section(self, name: str) -> Any | None:
        """The section ``name``, or None when no loaded plugin declares it."""
        return self._sections.get(name)

    def replace(self, **sections: Any) -> VLMDPOConfig:
        unknown = set(sections) - set(self._sections)
        if unknown:
            raise ConfigError(f"no config section(s) {sorted(unknown)} to replace; sections: {sorted(self._sections)}")
        return VLMDPOConfig(**{**self._sections, **sections})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, sections: SectionTypes) -> VLMDPOConfig:
        """Every declared section built from ``data`` (defaults where absent); an unknown key names the nearest."""
        data = dict(data or {})
        _reject_unknown(data, set(sections), prefix="")
        return cls(**{name: _build(kind, data.get(name), name) for name, kind in sections.items()})

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(section) for name, section in self._sections.items()}


CONFIG_PATH_VARIABLE = "VLM_DPO_CONFIG"
"""The environment variable the LLaMA-Factory and ms-swift adapters read the plugin config's path from."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A plugin config file's top-level mapping, read once; else a ``ConfigError`` naming the file (and the line)."""
    from vlm_dpo_plugins.config_files import origin_of, parse_yaml, read_text

    origin = origin_of(path, CONFIG_PATH_VARIABLE)
    path = Path(path)
    named = f"plugin config file {shown_path(path)}{origin}"
    data = parse_yaml(read_text(path, "plugin config file", origin), named)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{named}: expected a mapping of sections at the top level, got a {type(data).__name__} "
            f"({shown(data)}). Fix: write 'section: {{key: value}}' lines (freeze, loss, guards, ...)"
        )
    return dict(data)


def _reject_unknown(data: Mapping[str, Any], valid: set[str], prefix: str) -> None:
    for key in data:
        if key not in valid:
            if not isinstance(key, str):
                raise ConfigError(f"config key {shown(key)} under '{prefix or '(top level)'}' is not a name")
            raise ConfigError(f"unknown config key '{prefix}{shown(key)[1:-1]}'{_suggestion(key, valid, prefix)}")


def _suggestion(key: str, valid: set[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5) if len(key) <= 200 else []
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
            raise ConfigError(f"'{path}' must be a mapping of keys, got {shown(value)}")
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
            raise ConfigError(f"'{path}' is {shown(value)}; expected one of {list(choices)}{nearest(value, choices)}")
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
            raise ConfigError(f"'{path}' must be a list, got {shown(value)}")
        return tuple(_build(item_hint, item, f"{path}[{index}]") for index, item in enumerate(value))
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{path}' must be a mapping, got {shown(value)}")
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
    raise ConfigError(f"'{path}' must be {hint.__name__}, got {shown(value)}")
