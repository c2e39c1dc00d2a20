"""Optimizer parameter groups per freeze group, and adding unfrozen parameters to a live optimizer.

Each torch param group carries ``"group"`` (vision / projector / language / other) so
that parameters unfrozen later join the group that has their learning rate. A group
that only trains from a later stage is created empty from the start: the learning
rate scheduler then knows it from step 0, and unfreezing is a plain append.

Within a param group, parameters are kept in the model's order, so the optimizer's
``state_dict`` after an unfreeze step has the layout of an optimizer built fresh for
that step, which is what a resumed run builds before loading it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from vlm_dpo_plugins.freeze.names import named_parameters


def takes_weight_decay(parameter: torch.Tensor) -> bool:
    """Matrices decay; biases and norm scales (1-D) do not, as in the transformers Trainer."""
    return parameter.ndim >= 2


def optimizer_param_groups(
    model: torch.nn.Module, optimizer_groups: Sequence[Mapping[str, Any]], weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Turn the ``vlm_dpo_optimizer_groups`` answer into param groups a torch optimizer accepts.

    With ``weight_decay > 0`` each group splits into a decaying and a non-decaying part; every group
    states its ``weight_decay``, so the optimizer's default never applies.
    """
    parameters = dict(named_parameters(model))
    order = {name: index for index, name in enumerate(parameters)}
    param_groups = []
    for entry in optimizer_groups:
        unknown = [name for name in entry["names"] if name not in parameters]
        if unknown:
            raise KeyError(
                f"optimizer group '{entry['group']}' names {len(unknown)} parameter(s) the model does not have, "
                f"e.g. {unknown[0]!r}; classify the same model object the optimizer is built for"
            )
        names = sorted(entry["names"], key=order.__getitem__)
        if weight_decay > 0:
            for decays in (True, False):
                selected = [parameters[n] for n in names if takes_weight_decay(parameters[n]) == decays]
                param_groups.append(
                    {
                        "params": selected,
                        "lr": entry["lr"],
                        "weight_decay": weight_decay if decays else 0.0,
                        "group": entry["group"],
                    }
                )
        else:
            # Explicit 0.0: left out, the optimizer's own default applies (0.01 for torch.optim.AdamW).
            selected = [parameters[n] for n in names]
            param_groups.append({"params": selected, "lr": entry["lr"], "weight_decay": 0.0, "group": entry["group"]})
    return param_groups


def unfreeze_into_optimizer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    newly_trainable: Iterable[str],
    groups: Mapping[str, Iterable[str]],
    learning_rates: Mapping[str, float],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, list[str]]:
    """Add newly trainable parameters to ``optimizer``; return the names added, per group.

    A parameter already in the optimizer is never added again, and no existing
    optimizer state is touched: new parameters get their state at their first step.
    A parameter joins the param group tagged with its freeze group; when there is
    none (an optimizer built by a framework), a new param group with
    ``learning_rates[group]`` is added, and ``scheduler``, when given, is extended
    to schedule it. Only ``LambdaLR`` (every transformers scheduler) can be extended.
    """
    parameters = dict(named_parameters(model))
    order = {id(parameter): index for index, parameter in enumerate(parameters.values())}
    group_of = {name: group for group, names in groups.items() for name in names}
    present = {id(parameter) for param_group in optimizer.param_groups for parameter in param_group["params"]}

    wanted: dict[str, list[str]] = {}
    for name in sorted(newly_trainable, key=lambda n: order.get(id(parameters.get(n)), -1)):
        if name not in parameters:
            raise KeyError(f"newly trainable parameter {name!r} is not a parameter of the model")
        if name not in group_of:
            raise KeyError(f"newly trainable parameter {name!r} is in no freeze group; classify the model again")
        if id(parameters[name]) in present:
            continue
        present.add(id(parameters[name]))
        wanted.setdefault(group_of[name], []).append(name)

    created = []
    for group, names in wanted.items():
        for name in names:
            parameter = parameters[name]
            target = _param_group_for(optimizer, group, parameter)
            if target is None:
                lr = learning_rates.get(group, optimizer.defaults["lr"])
                optimizer.add_param_group({"params": [parameter], "lr": lr, "group": group})
                created.append(optimizer.param_groups[-1])
            else:
                target["params"].append(parameter)
    for param_group in optimizer.param_groups:
        if param_group.get("group") in wanted:
            param_group["params"].sort(key=lambda p: order.get(id(p), len(order)))
    if created and scheduler is not None:
        _schedule_new_groups(scheduler, created)
    return wanted


def _param_group_for(optimizer: torch.optim.Optimizer, group: str, parameter: torch.Tensor) -> dict | None:
    candidates = [param_group for param_group in optimizer.param_groups if param_group.get("group") == group]
    if len(candidates) > 1:
        decays = takes_weight_decay(parameter)
        matching = [pg for pg in candidates if (pg.get("weight_decay", 0.0) > 0) == decays]
        candidates = matching or candidates
    return candidates[0] if candidates else None


def _schedule_new_groups(scheduler: torch.optim.lr_scheduler.LRScheduler, created: list[dict]) -> None:
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(
            f"cannot add the unfrozen groups to a {type(scheduler).__name__} scheduler; build the optimizer with "
            "vlm_dpo_plugins.freeze.optimizer.optimizer_param_groups so every group exists from step 0"
        )
    for param_group in created:
        # The new group follows the schedule of the first one (transformers uses one lambda for all).
        factor = scheduler.lr_lambdas[0]
        param_group["initial_lr"] = param_group["lr"]
        scheduler.base_lrs.append(param_group["lr"])
        scheduler.lr_lambdas.append(factor)
        param_group["lr"] = param_group["initial_lr"] * factor(scheduler.last_epoch)
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr.append(param_group["lr"])
