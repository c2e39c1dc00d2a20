"""TRL's preference batch in the terms the loss hooks use.

TRL's collators stack ``[chosen; rejected]`` into 2B rows and repeat every image for the
rejected rows: the layout the shared step extends with a loss variant's extra rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from vlm_dpo_plugins.losses.logprobs import SequenceLogps
from vlm_dpo_plugins.sharing.forward import PreparedBatch

PER_TOKEN_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
"""The fused LM head's per-token fields (position t scores token t + 1)."""

NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = {key: value for key, value in batch.items() if key not in NON_MODEL_KEYS}
    kwargs["use_cache"] = False
    return kwargs


def completion_labels(batch: Mapping[str, Any]) -> torch.Tensor:
    """Input ids outside the completions set to -100: TRL's fused LM head scores only the completion tokens."""
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)


def summed_logps(per_token_logps: torch.Tensor, completion_mask: torch.Tensor) -> SequenceLogps:
    """Completion log-probs summed per row from the fused head's per-token output (position t scores token t + 1)."""
    shifted_mask = completion_mask[:, 1:]
    # Prompt-learning PEFT prepends virtual positions; the real tokens are the last ones.
    per_token_logps = per_token_logps[:, -shifted_mask.shape[1] :]
    logps = (per_token_logps * shifted_mask).sum(dim=1)
    return SequenceLogps(logps, shifted_mask.sum(dim=1))


def collated_outputs(outputs: Any, prepared: PreparedBatch) -> Any:
    """The fused head's output with its per-token fields in the collated 2B-row layout, however the rows ran."""
    if prepared.packed is None:
        return outputs
    fields = {name: getattr(outputs, name, None) for name in PER_TOKEN_OUTPUTS}
    mapped = {name: prepared.to_collated(value) for name, value in fields.items() if value is not None}
    if dataclasses.is_dataclass(outputs):
        return dataclasses.replace(outputs, **mapped)
    for name, value in mapped.items():
        outputs[name] = value
    return outputs
