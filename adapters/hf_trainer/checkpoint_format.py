"""Checkpoints whose weights ``resume_from_checkpoint`` actually loads back.

transformers 5 saves VLMs (LLaVA, Qwen2-VL, ...) in their original hub layout
(``language_model.model.layers...``) while the live model names them
``model.language_model.layers...``; from_pretrained renames on load, but the
Trainer's resume path calls ``model.load_state_dict(..., strict=False)`` on the raw
file. Every key misses, a warning lists them, and the "resumed" run trains on from
the initial weights (seen with transformers 5.23 and stock ``trl.DPOTrainer``, and with
stock LLaMA-Factory 0.9.5 full tuning on transformers 5.6). The shared step applies both
halves below in every framework.

So checkpoints are written in the live layout, which both loaders read, and a
checkpoint written in the hub layout (by stock TRL, say) is reloaded through
``from_pretrained``, which knows the renaming.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger("vlm_dpo_plugins.adapters")

SAFE_WEIGHTS = "model.safetensors"


@contextlib.contextmanager
def runtime_format_saves(model: Any) -> Iterator[None]:
    """``model.save_pretrained`` writes the live parameter names while the context is open."""
    save = getattr(type(model), "save_pretrained", None)
    if save is None or "save_original_format" not in inspect.signature(save).parameters:
        yield  # not a transformers model, or a transformers without the hub-layout rewrite
        return
    model.save_pretrained = functools.partial(save, model, save_original_format=False)
    try:
        yield
    finally:
        del model.save_pretrained


def reload_if_keys_were_renamed(model: Any, checkpoint_dir: str) -> bool:
    """Load the checkpoint's weights through ``from_pretrained`` when its names are not the live ones."""
    weights = os.path.join(checkpoint_dir, SAFE_WEIGHTS)
    if not os.path.isfile(weights) or not hasattr(type(model), "from_pretrained"):
        return False  # sharded, adapter-only, DeepSpeed or FSDP checkpoints load by their own paths
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as handle:
        saved = set(handle.keys())
    live = set(model.state_dict())
    if saved & live:
        return False
    logger.warning(
        "vlm-dpo: %s names its weights in the hub layout, which the Trainer's resume does not rename; "
        "loading it through from_pretrained instead",
        checkpoint_dir,
    )
    reloaded = type(model).from_pretrained(checkpoint_dir, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(reloaded.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"cannot resume from {checkpoint_dir}: {len(missing)} weights missing, e.g. {missing[:3]}")
    return True
