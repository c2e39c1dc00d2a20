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
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.config import VLMDPOConfig

PluginSource = VLMDPOConfig | Mapping[str, Any] | str | os.PathLike | None
SECTIONS = ("freeze", "collation", "loss", "guards", "diagnostics", "sharing")


def load_plugin_config(manager: Any, source: PluginSource) -> tuple[VLMDPOConfig, dict[str, set[str]]]:
    """The validated plugin config and, per section, the keys the user wrote."""
    if isinstance(source, VLMDPOConfig):
        manager.validate_loss_type(source)
        return source, _non_default_keys(source)
    if source is None or isinstance(source, Mapping):
        raw = dict(source or {})
    else:
        import yaml

        raw = yaml.safe_load(Path(source).read_text()) or {}
    config = manager.load_config(source)
    written = {section: set(values) for section, values in raw.items() if isinstance(values, Mapping)}
    return config, written


def _non_default_keys(config: VLMDPOConfig) -> dict[str, set[str]]:
    defaults = VLMDPOConfig()
    written: dict[str, set[str]] = {}
    for section in SECTIONS:
        ours, default = getattr(config, section), getattr(defaults, section)
        names = (entry.name for entry in dataclasses.fields(ours))
        written[section] = {name for name in names if getattr(ours, name) != getattr(default, name)}
    return written
