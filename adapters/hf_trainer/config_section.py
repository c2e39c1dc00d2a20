"""The plugins' section inside a framework's own run config, taken out before ``HfArgumentParser`` rejects the key.

For a framework whose users write one YAML (or command line) for the whole run, parsed by ``HfArgumentParser``
(LLaMA-Factory). The section (a mapping or a YAML path; else ``VLM_DPO_CONFIG``; else the defaults) and the keys
the user wrote (to tell a written value from a default) are kept for the training workflow of the same process:
every process, torchrun and Ray workers included, parses the same config itself, so nothing travels between them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.run import CONFIG_VARIABLE, command_line_keys, settings_source

from vlm_dpo_plugins.errors import ConfigError


@dataclass(frozen=True)
class ParsedSection:
    source: Mapping[str, Any] | str | None
    """What ``load_plugin_config`` reads: the section, a YAML path, or None for the defaults."""
    written: frozenset[str] = field(default_factory=frozenset)
    """The framework's own keys present in the user's config (top level) or on its command line."""
    origin: str = "defaults"


class ConfigSection:
    """The section named ``key`` in the configs a framework parses; ``latest`` is the one parsed last."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.latest = ParsedSection(None)

    def split(self, args: Any) -> Any:
        """``args`` without the section (a new dict; the caller's is untouched); the section is kept."""
        if isinstance(args, Mapping):
            section = args.get(self.key)
            self.latest = self._parsed(section, frozenset(key for key in args if key != self.key))
            return {key: value for key, value in args.items() if key != self.key}
        if isinstance(args, list):
            written = command_line_keys(args)
            if self.key in written:
                raise ConfigError(
                    f"--{self.key} on the command line is not supported: put a '{self.key}:' section in the "
                    f"YAML config, or set {CONFIG_VARIABLE}=path/to/vlm_dpo.yaml"
                )
            self.latest = self._parsed(None, written)
        return args

    def _parsed(self, section: Any, written: frozenset[str]) -> ParsedSection:
        named = f"{self.key}: {section}" if isinstance(section, (str, os.PathLike)) else f"'{self.key}:' section"
        source, origin = settings_source(section, named)
        return ParsedSection(source, written, origin)
