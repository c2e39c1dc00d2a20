"""Gradient checkpointing and DDP settings that do not raise "Expected to mark a variable ready only once".

Why the error happens: reentrant checkpointing runs a segment's forward under
``no_grad`` and its recomputation in a second, nested backward pass. DDP with
``find_unused_parameters=True`` walks the autograd graph after the forward, does
not find the parameters inside such segments, marks them ready as unused, and then
sees their gradient hooks fire again during the recomputation. TRL turns
``find_unused_parameters`` on for vision-language models, and users do the same
(a frozen tower or a text-only batch leaves parameters without gradients);
LLaMA-Factory defaults to reentrant checkpointing, ms-swift too outside plain DDP;
LoRA needs ``enable_input_require_grads`` for reentrant segments to pass gradients
at all. Together: the Qwen2.5-VL LoRA DDP crash.

The fix, in order of preference:
- ``use_reentrant=False``: the recomputation happens inside the one backward pass,
  every parameter is in the graph DDP walks, each hook fires once, and any
  ``find_unused_parameters`` value is safe.
- Where reentrant checkpointing must stay, DDP's ``static_graph=True`` (with
  ``find_unused_parameters=False``): DDP records the first iteration and tolerates
  reentrant backward passes; it requires the same parameters to be used every step.
- PEFT under DeepSpeed ZeRO-3 keeps reentrant checkpointing: non-reentrant
  recomputation of ZeRO-3's gathered parameters fails there (TRL forces the same,
  trl#2514), and DeepSpeed has no DDP reducer, so the error cannot occur.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlm_dpo_plugins.types import RunContext


@dataclass(frozen=True)
class CheckpointingPlan:
    gradient_checkpointing_kwargs: dict[str, Any]
    ddp_kwargs: dict[str, Any] = field(default_factory=dict)
    """DistributedDataParallel arguments that must be set; empty when any value works or DDP is not used."""
    input_requires_grad: bool = False
    """Call ``model.enable_input_require_grads()``: reentrant segments fed by frozen layers pass no gradient else."""
    reason: str = ""


def checkpointing_plan(
    context: RunContext, *, frozen_parameters: bool, prefer_non_reentrant: bool = True
) -> CheckpointingPlan:
    """Choose reentrant or not, and the DDP settings, for a run; ``frozen_parameters``: LoRA or frozen towers."""
    frozen = frozen_parameters or context.uses_peft
    uses_ddp = context.is_distributed and not (context.uses_deepspeed or context.uses_fsdp)
    if context.uses_deepspeed and context.deepspeed_stage == 3 and context.uses_peft:
        return CheckpointingPlan(
            {"use_reentrant": True},
            input_requires_grad=True,
            reason="PEFT under DeepSpeed ZeRO-3: non-reentrant recomputation of gathered parameters fails there, "
            "and without a DDP reducer reentrant checkpointing is safe",
        )
    if prefer_non_reentrant:
        return CheckpointingPlan(
            {"use_reentrant": False},
            reason="non-reentrant checkpointing recomputes inside the one backward pass, so DDP marks every "
            "parameter ready once, whatever find_unused_parameters is",
        )
    if uses_ddp and context.gradient_checkpointing:
        return CheckpointingPlan(
            {"use_reentrant": True},
            ddp_kwargs={"static_graph": True, "find_unused_parameters": False},
            input_requires_grad=frozen,
            reason="reentrant checkpointing under DDP: static_graph tolerates reentrant backward passes, "
            "find_unused_parameters=True would mark checkpointed parameters ready twice; the same parameters "
            "must be used every step (no progressive unfreezing under DDP)",
        )
    return CheckpointingPlan(
        {"use_reentrant": True},
        input_requires_grad=frozen,
        reason="reentrant checkpointing without a DDP reducer (single process, DeepSpeed or FSDP)",
    )
