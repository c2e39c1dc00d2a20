"""The plugin config an adapter was given, and which of its keys the user actually wrote.

Adapters reconcile the plugin config with the framework's own arguments (beta, loss type,
clipping, freeze flags): a value written in both places and different is an error, a value
written in one place is used by both. "Written" is therefore part of what a config source
yields: the keys present in a mapping or YAML file, or for a ``VLMDPOConfig`` object the
values other than the defaults.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from vlm_dpo_plugins.config import VLMDPOConfig, read_yaml

PluginSource = VLMDPOConfig | Mapping[str, Any] | str | os.PathLike | None


def load_plugin_config(manager: Any, source: PluginSource) -> tuple[VLMDPOConfig, dict[str, set[str]]]:
    """The validated plugin config and, per section, the keys the user wrote."""
    if isinstance(source, VLMDPOConfig):
        config = manager.load_config(source)
        return config, _non_default_keys(config)
    raw = dict(source or {}) if source is None or isinstance(source, Mapping) else read_yaml(source)
    config = manager.load_config(raw)
    written = {section: set(values) for section, values in raw.items() if isinstance(values, Mapping)}
    return config, written


def _non_default_keys(config: VLMDPOConfig) -> dict[str, set[str]]:
    written: dict[str, set[str]] = {}
    for name, section in config.sections.items():
        fields = [entry.name for entry in dataclasses.fields(section)]
        try:
            default = type(section)()
        except TypeError:  # a plugin's section with required fields: every field was given
            written[name] = set(fields)
            continue
        written[name] = {field for field in fields if getattr(section, field) != getattr(default, field)}
    return written
