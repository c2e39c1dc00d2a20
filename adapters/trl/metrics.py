"""The token-level metrics TRL's ``DPOTrainer`` logs, recorded for a loss the plugins computed.

Users read them on their dashboards beside ``rewards/*`` (``preference_step.preference_metrics``);
swapping the trainer must not take them away. They come from the fused LM head's extra outputs, as in TRL.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch



def record_token_metrics(
    metrics: MutableMapping[str, list[float]], accelerator: Any, outputs: Any, completion_mask: torch.Tensor
) -> None:
    """Entropy, mean logits and top-1 accuracy over the completion tokens of the 2B preference rows."""
    gather = accelerator.gather_for_metrics
    mask = completion_mask[:, 1:]
    length = mask.shape[1]
    rows = mask.shape[0]
    chosen_mask, rejected_mask = mask.chunk(2)

    def total(value: torch.Tensor) -> float:
        return gather(value.detach().reshape(1)).sum().item()

    if getattr(outputs, "entropy", None) is not None:
        tokens = total(mask.sum())
        entropy = total((outputs.entropy[:rows, -length:] * mask).sum())
        metrics["entropy"].append(entropy / tokens if tokens > 0 else 0.0)
    if getattr(outputs, "mean_logits", None) is not None:
        chosen_logits, rejected_logits = outputs.mean_logits[:rows, -length:].chunk(2)
        sides = (("chosen", chosen_logits, chosen_mask), ("rejected", rejected_logits, rejected_mask))
        for name, logits, side_mask in sides:
            count = total(side_mask.sum())
            summed = total(logits[side_mask.bool()].sum())
            metrics[f"logits/{name}"].append(summed / count if count > 0 else 0.0)
    if getattr(outputs, "is_top1", None) is not None:
        chosen_top1, _ = outputs.is_top1[:rows, -length:].chunk(2)
        count = total(chosen_mask.sum())
        correct = total((chosen_top1 & chosen_mask.bool()).sum())
        metrics["mean_token_accuracy"].append(correct / count if count > 0 else 0.0)
