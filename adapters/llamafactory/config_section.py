"""The ``vlm_dpo:`` section of a LLaMA-Factory config, taken out before its parser rejects the key
(``hf_trainer/config_section.py``); in another stage's config it is checked and ignored."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.config_section import ConfigSection

SECTION = ConfigSection("vlm_dpo")
logger = logging.getLogger("vlm_dpo_plugins.adapters.llamafactory")


def split_section(args: Any) -> Any:
    """``args`` without the section, which ``SECTION.latest`` keeps for this process's DPO workflow."""
    without = SECTION.split(args)
    stage = args.get("stage", "sft") if isinstance(args, Mapping) else "dpo"
    if stage != "dpo" and args.get(SECTION.key) is not None:
        _checked_and_ignored(stage)
    return without


def _checked_and_ignored(stage: Any) -> None:
    """The plugins hook LLaMA-Factory's DPO stage only: a section in another stage's config is validated (a typo
    there would otherwise surface only when the config is reused for DPO) and then said to be ignored."""
    from vlm_dpo_plugins.config_source import load_plugin_config
    from vlm_dpo_plugins.manager import create_plugin_manager

    load_plugin_config(create_plugin_manager(), SECTION.latest.source)
    logger.warning(
        "vlm-dpo: the '%s:' section applies to stage: dpo only; this run is stage: %s, so it was checked and is "
        "ignored",
        SECTION.key,
        stage,
    )
