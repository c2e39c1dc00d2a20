"""The ``vlm_dpo:`` section taken out of a LLaMA-Factory config before ``HfArgumentParser`` rejects the key.

The section (a mapping or a YAML path; else ``VLM_DPO_CONFIG``; else the defaults) and the keys the user wrote
(to tell a written value from a default) are kept for the DPO workflow of the same process: every process,
torchrun and Ray workers included, parses the same YAML itself, so nothing travels between processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.run import CONFIG_VARIABLE, command_line_keys, settings_source

from vlm_dpo_plugins.errors import ConfigError

SECTION_KEY = "vlm_dpo"
logger = logging.getLogger("vlm_dpo_plugins.adapters.llamafactory")


@dataclass(frozen=True)
class ParsedSection:
    source: Mapping[str, Any] | str | None
    """What ``load_plugin_config`` reads: the section, a YAML path, or None for the defaults."""
    written: frozenset[str] = field(default_factory=frozenset)
    """LLaMA-Factory's own keys present in the user's config (top level)."""
    origin: str = "defaults"


_latest = ParsedSection(None)


def split_section(args: Any) -> Any:
    """``args`` without the section (a new dict; the caller's is untouched); the section is remembered."""
    global _latest
    if isinstance(args, Mapping):
        written = frozenset(key for key in args if key != SECTION_KEY)
        section = args.get(SECTION_KEY)
        _latest = _parsed(section, written)
        if section is not None and args.get("stage", "sft") != "dpo":
            _checked_and_ignored(_latest, args.get("stage", "sft"))
        return {key: value for key, value in args.items() if key != SECTION_KEY}
    if isinstance(args, list):
        written = command_line_keys(args)
        if SECTION_KEY in written:
            raise ConfigError(
                f"--{SECTION_KEY} on the command line is not supported: put a '{SECTION_KEY}:' section in the "
                f"YAML config, or set {CONFIG_VARIABLE}=path/to/vlm_dpo.yaml"
            )
        _latest = _parsed(None, written)
    return args


def _checked_and_ignored(parsed: ParsedSection, stage: Any) -> None:
    """The plugins hook LLaMA-Factory's DPO stage only: a section in another stage's config is validated (a typo
    there would otherwise surface only when the config is reused for DPO) and then said to be ignored."""
    from vlm_dpo_plugins.config_source import load_plugin_config
    from vlm_dpo_plugins.manager import create_plugin_manager

    load_plugin_config(create_plugin_manager(), parsed.source)
    logger.warning(
        "vlm-dpo: the '%s:' section applies to stage: dpo only; this run is stage: %s, so it was checked and is "
        "ignored",
        SECTION_KEY,
        stage,
    )


def latest() -> ParsedSection:
    """The section of the config parsed last in this process."""
    return _latest


def _parsed(section: Any, written: frozenset[str]) -> ParsedSection:
    origin = f"{SECTION_KEY}: {section}" if isinstance(section, (str, os.PathLike)) else f"'{SECTION_KEY}:' section"
    source, origin = settings_source(section, origin)
    return ParsedSection(source, written, origin)
