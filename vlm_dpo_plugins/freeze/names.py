"""Parameter names as the model defines them, whatever wraps its modules in place.

FSDP's activation checkpointing (ms-swift's ``--fsdp fsdp2`` turns it on; accelerate's
``activation_checkpointing``) and ``torch.compile`` replace submodules with wrappers, which puts
``_checkpoint_wrapped_module.`` or ``_orig_mod.`` inside the names ``named_parameters()`` returns. The freeze
groups are named once, so every lookup by name goes through the names without those parts.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def named_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``model.named_parameters()`` under the names the model defines (``plain_name``)."""
    for name, parameter in model.named_parameters():
        yield plain_name(name), parameter
