"""TRL's fused LM head under FSDP2, with the head's gradient averaged over the ranks like every other weight's.

accelerate's FSDP2 wraps the LM head as a unit of its own, and TRL 1.16's fused head never calls that unit: it
takes the head's weight, a sharded DTensor, through ``weight.full_tensor()``. The backward of that gather hands
each rank its own slice of its own gradient, with no reduction, so the head's gradient is never averaged over
the ranks while the rest of the model's is: each rank's shard of the head steps on that rank's batches alone
(on the tiny LLaVA, 57% of the head's gradient norm off the DDP and one-process gradient; stock TRL the same).
Unsharding the head unit before the call makes its weight the unsharded parameter FSDP2 manages, and FSDP2's
end-of-backward reduce-scatters (averages) that gradient as it does a unit whose forward ran. A pass without
gradients (the reference) reshards it again at once. A frozen head (LoRA) is left to TRL: it has no gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def head_unsharded(model: Any) -> Iterator[None]:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    # A frozen head (LoRA) has no gradient to average, and one already unsharded belongs to a pass whose backward
    # is still to come (a LoRA reference pass runs the policy's own head): both are left as they are.
    if not isinstance(head, FSDPModule) or not isinstance(weight, DTensor) or not weight.requires_grad:
        yield
        return
    head.unshard()
    try:
        yield
    finally:
        if not torch.is_grad_enabled():
            head.reshard()
