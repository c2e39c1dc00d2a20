"""The guards' DDP settings written into ``TrainingArguments`` before the Trainer wraps the model in DDP."""

from __future__ import annotations

import logging
from typing import Any

from vlm_dpo_plugins.types import RunContext

logger = logging.getLogger("vlm_dpo_plugins.adapters")


def apply_ddp_plan(plugins: Any, context: RunContext, args: Any) -> None:
    """``static_graph``/``find_unused_parameters`` that cannot raise "Expected to mark a variable ready only once"."""
    ddp = plugins.hook.vlm_dpo_ddp_kwargs(context=context) or {}
    if "static_graph" in ddp:
        args.ddp_static_graph = ddp["static_graph"]
    if "find_unused_parameters" in ddp:
        if args.ddp_find_unused_parameters not in (None, ddp["find_unused_parameters"]):
            logger.warning(
                "vlm-dpo: ddp_find_unused_parameters=%s changed to %s: with reentrant checkpointing under DDP it "
                "raises 'Expected to mark a variable ready only once'",
                args.ddp_find_unused_parameters,
                ddp["find_unused_parameters"],
            )
        args.ddp_find_unused_parameters = ddp["find_unused_parameters"]
