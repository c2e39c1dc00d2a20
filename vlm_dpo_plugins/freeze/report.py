"""How many parameters of each group train: the numbers and the one log line that shows them."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from vlm_dpo_plugins.freeze.names import named_parameters

LOGGER = logging.getLogger("vlm_dpo_plugins.freeze")


def trainable_report(groups: Mapping[str, list[str]], model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Per group: total parameters, trainable parameters, and the trainable share of the whole model."""
    parameters = dict(named_parameters(model))
    total = sum(p.numel() for p in parameters.values()) or 1
    report = {}
    for group, names in groups.items():
        count = sum(parameters[n].numel() for n in names)
        trainable = sum(parameters[n].numel() for n in names if parameters[n].requires_grad)
        report[group] = {"parameters": count, "trainable": trainable, "trainable_share": trainable / total}
    return report


def format_trainable_report(report: Mapping[str, Mapping[str, float]]) -> str:
    total = sum(numbers["parameters"] for numbers in report.values())
    trainable = sum(numbers["trainable"] for numbers in report.values())
    lines = [f"trainable parameters: {trainable:,} of {total:,} ({_percent(trainable, total)})"]
    for group, numbers in report.items():
        lines.append(
            f"  {group:<10} {numbers['trainable']:>14,} of {numbers['parameters']:>14,} trainable"
            f" ({_percent(numbers['trainable'], numbers['parameters'])} of the group,"
            f" {_percent(numbers['trainable'], total)} of the model)"
        )
    return "\n".join(lines)


def _percent(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.2f}%" if whole else "n/a"
