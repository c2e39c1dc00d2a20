"""Wires the adapter into LLaMA-Factory when it imports ``llamafactory.train.dpo`` (docs/llamafactory.md).

Both wrapped functions are looked up by name when LLaMA-Factory calls them, so the wrappers are what runs.
TRL and the trainer are imported only when a DPO run starts: ``tuner.py`` imports every stage's workflow.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.activation import SupportedReleases, wrap_once
from vlm_dpo_plugins.adapters.hf_trainer.console import configure_logging

RELEASES = SupportedReleases("LLaMA-Factory", "llamafactory", minimum="0.9.5", below="0.10", tested="0.9.5")
SUPPORTED_RANGE = RELEASES.range


def activate(dpo_package: ModuleType | None = None) -> bool:
    """Wrap LLaMA-Factory's parser and DPO workflow; True when active. Calling it again changes nothing."""
    import llamafactory

    if RELEASES.stays_off(llamafactory.__version__):
        return False
    dpo_package = dpo_package or sys.modules["llamafactory.train.dpo"]
    from llamafactory.hparams import parser
    from vlm_dpo_plugins.adapters.llamafactory.config_section import split_section
    from vlm_dpo_plugins.adapters.llamafactory.workflow import plugin_run_dpo

    wrap_once(parser, "_parse_args", _parse_args_without_section(parser, split_section))
    wrap_once(dpo_package, "run_dpo", plugin_run_dpo)
    configure_logging_as_llamafactory()
    return True


def _parse_args_without_section(parser: ModuleType, split_section: Any) -> Any:
    def make(stock_parse_args: Any) -> Any:
        @functools.wraps(stock_parse_args)
        def _parse_args(hf_parser: Any, args: Any = None, allow_extra_keys: bool = False) -> Any:
            return stock_parse_args(hf_parser, split_section(parser.read_args(args)), allow_extra_keys)

        return _parse_args

    return make


def configure_logging_as_llamafactory() -> None:
    """LLaMA-Factory's own line format: ``[LEVEL|logger] message``."""
    configure_logging("[%(levelname)s|%(name)s] %(message)s")
