"""Who builds the optimizer: the freeze policy (one param group per freeze group, each with its learning rate),
or the framework, and the line that says why when it is the framework."""

from __future__ import annotations

from typing import Any

PASSED_IN = (
    "the optimizer was passed in (optimizers=...), so freeze.learning_rates and unfreeze stages cannot add "
    "per-group learning rates; frozen parameters simply get no gradient"
)
RESUMED_FROM_STOCK = (
    "resuming from a checkpoint written without vlm-dpo-plugins: the optimizer keeps the Trainer's param groups "
    "so its saved state loads; freeze.learning_rates do not apply in this run"
)


def framework_builds_optimizer(
    args: Any, *, resumed_from_stock_checkpoint: bool, framework_reason: str | None
) -> tuple[bool, str | None]:
    """(the framework builds it, the warning to log or None)."""
    deepspeed_config = getattr(args, "hf_deepspeed_config", None)
    if deepspeed_config is not None and "optimizer" in deepspeed_config.config:
        return True, None  # DeepSpeed builds the optimizer from its own config
    if resumed_from_stock_checkpoint:
        return True, RESUMED_FROM_STOCK
    if framework_reason is not None:
        return True, f"{framework_reason} builds the optimizer; freeze.learning_rates do not apply in this run"
    return False, None
