"""Apply a trainable-parameter set to a model; used by the adapters at init and at unfreeze steps.

With PEFT adapters in the model, a group that has adapters trains through them
(LoRA on the language model leaves its norms, embeddings and base weights frozen,
as PEFT intends), and a group without adapters trains in full when it is trainable
(the projector unfrozen by a schedule stage). Frozen base weights under an adapter
(``base_layer``, ``original_module``) never train.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vlm_dpo_plugins.freeze.names import named_parameters

__all__ = ["apply_trainable", "is_adapter_base", "is_adapter_parameter"]

ADAPTER_PREFIXES = ("lora_", "ia3_", "oft_", "boft_", "vera_", "hra_", "adaption_")
ADAPTER_BASE_PARTS = frozenset({"base_layer", "original_module"})


def is_adapter_parameter(name: str) -> bool:
    parts = name.split(".")
    return "modules_to_save" in parts or any(part.startswith(ADAPTER_PREFIXES) for part in parts)


def is_adapter_base(name: str) -> bool:
    return not ADAPTER_BASE_PARTS.isdisjoint(name.split("."))


def apply_trainable(
    model: torch.nn.Module, trainable: set[str], groups: Mapping[str, list[str]] | None = None
) -> set[str]:
    """Set ``requires_grad`` from ``trainable``; return the names that became trainable.

    ``groups`` (the classification) is needed only with PEFT adapters, to tell a
    group that trains through its adapters from one that trains in full.
    """
    through_adapters = set()
    if groups is not None:
        through_adapters = {
            name for members in groups.values() if any(map(is_adapter_parameter, members)) for name in members
        }
    newly_trainable = set()
    for name, parameter in named_parameters(model):
        wanted = name in trainable and not is_adapter_base(name)
        if wanted and name in through_adapters:
            wanted = is_adapter_parameter(name)
        if wanted and not parameter.requires_grad:
            newly_trainable.add(name)
        parameter.requires_grad_(wanted)
    return newly_trainable
