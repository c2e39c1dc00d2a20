"""Which modules LoRA should wrap: linear layers of trainable groups, never patch embeddings or the LM head.

The names are full module paths, which PEFT's ``target_modules`` matches exactly.
Short suffixes such as ``q_proj`` would not do: CLIP and SigLIP vision towers have
their own ``q_proj``, and LoRA on a frozen vision tower is one way a VLM run ends up
training the parts the freeze policy meant to keep fixed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

# Patch embeddings turn pixels into tokens; a low-rank update there is not what LoRA is
# for, and several are Conv2d/Conv3d, which not every PEFT version wraps.
PATCH_EMBEDDING = re.compile(
    r"^(?:patch_(?:embed|embeds|embedding|embeddings|embedder|conv|projection)|embed_patches)$"
)


def lora_target_modules(model: torch.nn.Module, allowed_parameters: Iterable[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules whose weight is in ``allowed_parameters``, sorted."""
    allowed = set(allowed_parameters)
    output_embeddings = _output_embeddings(model)
    # nn.MultiheadAttention reads its out_proj weight directly and never calls the module,
    # so a LoRA wrapper there would silently do nothing (SigLIP's pooling head has one).
    never_called = {
        id(child)
        for module in model.modules()
        if isinstance(module, torch.nn.MultiheadAttention)
        for child in module.children()
    }
    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and f"{name}.weight" in allowed
        and module is not output_embeddings
        and id(module) not in never_called
        and name.split(".")[-1] != "lm_head"
        and not any(PATCH_EMBEDDING.match(part) for part in name.split("."))
    )


def _output_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None
