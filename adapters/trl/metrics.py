"""The metrics TRL's ``DPOTrainer`` logs, recorded for a loss the plugins computed.

Users read ``rewards/margins`` and friends on their dashboards; swapping the trainer
must not take them away. The rewards are the loss variant's own implicit rewards
(``beta * log-ratio`` for DPO, length-normalised for SimPO), gathered over ranks; the
token-level metrics come from the fused LM head's extra outputs, as in TRL; the
variant's own metrics (``mdpo/...``) are averaged over ranks.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch

from vlm_dpo_plugins.types import LossOutput, PreferenceLogps


def record_preference_metrics(
    metrics: MutableMapping[str, list[float]],
    accelerator: Any,
    output: LossOutput,
    logps: PreferenceLogps,
) -> None:
    gather = accelerator.gather_for_metrics
    chosen, rejected = gather(output.chosen_rewards.detach()), gather(output.rejected_rewards.detach())
    metrics["rewards/chosen"].append(chosen.float().mean().item())
    metrics["rewards/rejected"].append(rejected.float().mean().item())
    metrics["rewards/accuracies"].append((chosen > rejected).float().mean().item())
    metrics["rewards/margins"].append((chosen - rejected).float().mean().item())
    metrics["logps/chosen"].append(gather(logps.chosen.detach()).float().mean().item())
    metrics["logps/rejected"].append(gather(logps.rejected.detach()).float().mean().item())
    own = {name: value for name, value in output.metrics.items() if not name.startswith("rewards/")}
    if own:
        device = output.losses.device
        values = gather(torch.tensor(list(own.values()), dtype=torch.float32, device=device)[None])
        for name, mean in zip(own, values.mean(dim=0).tolist()):
            metrics[name].append(mean)


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
