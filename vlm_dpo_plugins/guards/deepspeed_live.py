"""The bucket sizes the live DeepSpeed ZeRO optimizer really uses, read back from the engine.

The tuning report says what was written into the config; a framework or launcher that rewrites the
config after that (or a DeepSpeed release that reads a key under another name) would leave the engine
on its 5e8-element defaults without a word. Reading the sizes back from the optimizer the engine
built closes that gap. DeepSpeed is never imported: the engine comes from the framework.
"""

from __future__ import annotations

from typing import Any

LIVE_SIZES = {
    "reduce_bucket_size": "reduce_bucket_size",
    "allgather_bucket_size": "allgather_bucket_size",  # ZeRO 1-2
    "stage3_prefetch_bucket_size": "parameter_offload._prefetch_bucket_sz",  # ZeRO-3's parameter coordinator
}


def _attribute(owner: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        owner = getattr(owner, name, None)
        if owner is None:
            return None
    return owner


def live_bucket_sizes(engine: Any) -> dict[str, int]:
    """Each size the engine's ZeRO optimizer holds, by its config key; empty without a ZeRO optimizer."""
    optimizer = getattr(engine, "optimizer", None)
    sizes = {key: _attribute(optimizer, path) for key, path in LIVE_SIZES.items()}
    return {key: int(value) for key, value in sizes.items() if isinstance(value, (int, float))}


def describe_live_buckets(engine: Any) -> str | None:
    """One line for the run's log, e.g. "DeepSpeed ZeRO-2 optimizer holds reduce_bucket_size 8704, ..."."""
    sizes = live_bucket_sizes(engine)
    if not sizes:
        return None
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else "?"
    held = ", ".join(f"{key} {value}" for key, value in sizes.items())
    return f"DeepSpeed ZeRO-{stage} optimizer holds {held}"
