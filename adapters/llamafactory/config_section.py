"""The ``vlm_dpo:`` section of a LLaMA-Factory config, taken out before LLaMA-Factory's parser sees it.

LLaMA-Factory parses its YAML (plus ``key=value`` overrides) into one dict and hands it to
``HfArgumentParser``, which rejects unknown keys. The adapter wraps LLaMA-Factory's
``_parse_args`` so the parser gets the dict without the section; the section, and the
names of every key the user wrote (needed to tell a written value from a default when
reconciling), are kept for the DPO workflow in the same process. Every process parses
the same YAML itself (torchrun workers re-read it; Ray workers get the dict), so nothing
has to travel between processes.

The section may be a mapping or the path of a YAML file. Without it, ``VLM_DPO_CONFIG``
(a YAML path) is read; with neither, the defaults apply.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vlm_dpo_plugins.errors import ConfigError

SECTION_KEY = "vlm_dpo"
CONFIG_PATH_VARIABLE = "VLM_DPO_CONFIG"


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
        return {key: value for key, value in args.items() if key != SECTION_KEY}
    if isinstance(args, list):
        written = frozenset(token[2:].split("=", 1)[0] for token in args if str(token).startswith("--"))
        if SECTION_KEY in written:
            raise ConfigError(
                f"--{SECTION_KEY} on the command line is not supported: put a '{SECTION_KEY}:' section in the "
                f"YAML config, or set {CONFIG_PATH_VARIABLE}=path/to/vlm_dpo.yaml"
            )
        _latest = _parsed(None, written)
    return args


def latest() -> ParsedSection:
    """The section of the config parsed last in this process."""
    return _latest


def _parsed(section: Any, written: frozenset[str]) -> ParsedSection:
    from_environment = os.environ.get(CONFIG_PATH_VARIABLE)
    if section is not None and from_environment:
        raise ConfigError(
            f"the config has a '{SECTION_KEY}:' section and {CONFIG_PATH_VARIABLE}={from_environment} is set: "
            "give the plugin settings in one place"
        )
    if section is None:
        if from_environment:
            return ParsedSection(from_environment, written, f"{CONFIG_PATH_VARIABLE}={from_environment}")
        return ParsedSection(None, written)
    if isinstance(section, (Mapping, str, os.PathLike)):
        origin = f"'{SECTION_KEY}:' section" if isinstance(section, Mapping) else f"{SECTION_KEY}: {section}"
        return ParsedSection(section, written, origin)
    raise ConfigError(
        f"'{SECTION_KEY}' in the LLaMA-Factory config is {section!r}: expected a mapping of plugin settings "
        "(freeze, loss, guards, ...) or the path of a YAML file with them"
    )
