"""Apply a trainable-parameter set to a model; used by the adapters at init and at unfreeze steps."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def apply_trainable(model: torch.nn.Module, trainable: set[str]) -> set[str]:
    """Set ``requires_grad`` from ``trainable``; return the names that became trainable."""
    newly_trainable = set()
    for name, parameter in model.named_parameters():
        wanted = name in trainable
        if wanted and not parameter.requires_grad:
            newly_trainable.add(name)
        parameter.requires_grad_(wanted)
    return newly_trainable


def trainable_report(groups: Mapping[str, list[str]], model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Per group: total parameters, trainable parameters, and the trainable share of the whole model."""
    parameters = dict(model.named_parameters())
    total = sum(p.numel() for p in parameters.values()) or 1
    report = {}
    for group, names in groups.items():
        count = sum(parameters[n].numel() for n in names)
        trainable = sum(parameters[n].numel() for n in names if parameters[n].requires_grad)
        report[group] = {"parameters": count, "trainable": trainable, "trainable_share": trainable / total}
    return report
