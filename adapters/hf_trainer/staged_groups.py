"""Unfreeze stages under DeepSpeed ZeRO: every later stage's parameters in the optimizer from the start, inert.

ZeRO partitions the optimizer over the parameters trainable when ``deepspeed.initialize`` runs, and no parameter
can join it later. So each stage's parameters (per freeze group) get a param group of their own when the optimizer
is built, at learning rate 0 and with their gradients zeroed by a tensor hook before ZeRO reduces them: AdamW then
moves them by exactly nothing (its decoupled weight decay is scaled by the rate too), they add nothing to the
clipped norm, and their moments stay zero. At the stage the hook comes off, the group takes its freeze group's
rate (the scheduler's base rate too), and its optimizer state is reset, so its first update is the one a fresh
param group makes on one process or under DDP. The layout never changes, so a checkpoint from before or after a
stage resumes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from vlm_dpo_plugins.freeze.names import named_parameters
from vlm_dpo_plugins.freeze.optimizer import optimizer_param_groups

STAGE_KEY = "vlm_dpo_stage"
"""The param-group key naming the optimizer step a staged group starts training at."""


def names_by_stage(wants: Callable[[int], set[str] | None], stage_steps: Iterable[int]) -> dict[int, set[str]]:
    """``{at_step: names that start training there}`` from the policy's trainable set at each step."""
    before = wants(0) or set()
    stages = {}
    for step in sorted(stage_steps):
        now = wants(step) or set()
        stages[step] = now - before
        before = now
    return {step: names for step, names in stages.items() if names}


def staged_param_groups(
    model: torch.nn.Module,
    stages: Mapping[int, set[str]],
    groups: Mapping[str, Iterable[str]],
    learning_rates: Mapping[str, float],
    base_learning_rate: float,
    weight_decay: float,
    next_step: int,
) -> list[dict[str, Any]]:
    """A param group per stage and freeze group: rate 0 until its stage, its group's rate from then on.

    ``next_step``: the optimizer step the run takes next (a resumed run's checkpoint step); the stages before it
    have started. A stage at ``next_step`` itself starts when that step begins, as in the uninterrupted run.
    """
    param_groups = []
    for at_step, names in sorted(stages.items()):
        for group, members in groups.items():
            selected = [name for name in members if name in names]
            if not selected:
                continue
            rate = learning_rates.get(group, base_learning_rate) if at_step < next_step else 0.0
            entry = {"group": group, "names": selected, "lr": rate}
            for param_group in optimizer_param_groups(model, [entry], weight_decay=weight_decay):
                if param_group["params"]:
                    param_groups.append({**param_group, STAGE_KEY: at_step})
    return param_groups


class GradientsZeroed:
    """Tensor hooks that zero the held parameters' gradients before DeepSpeed's own hooks reduce them."""

    def __init__(self, model: torch.nn.Module, names: set[str]) -> None:
        self._handles = {
            name: parameter.register_hook(torch.zeros_like)
            for name, parameter in named_parameters(model)
            if name in names
        }

    def release(self, names: Iterable[str]) -> None:
        for name in names:
            handle = self._handles.pop(name, None)
            if handle is not None:
                handle.remove()

    def remove(self) -> None:
        self.release(list(self._handles))


def start_stage(
    optimizer: Any, scheduler: Any, step: int, learning_rates: Mapping[str, float], base_learning_rate: float
) -> int:
    """The staged groups of ``step`` at their rate, with fresh optimizer state; how many groups started.

    ``optimizer`` is the trainer's (accelerate's wrapper around DeepSpeed's ZeRO optimizer); ``scheduler`` the
    transformers ``LambdaLR``, whose param groups are those of the torch optimizer ZeRO steps, built here.
    """
    torch_optimizer = scheduler.optimizer
    while hasattr(torch_optimizer, "optimizer"):  # accelerate's and DeepSpeed's wrappers: their state proxies
        torch_optimizer = torch_optimizer.optimizer
    started = 0
    for index, param_group in enumerate(torch_optimizer.param_groups):
        if param_group.get(STAGE_KEY) != step:
            continue
        rate = learning_rates.get(param_group["group"], base_learning_rate)
        param_group["initial_lr"] = rate
        scheduler.base_lrs[index] = rate
        param_group["lr"] = rate * scheduler.lr_lambdas[index](scheduler.last_epoch)
        for parameter in _stepped_parameters(optimizer, torch_optimizer, index):
            for value in torch_optimizer.state.get(parameter, {}).values():
                if isinstance(value, torch.Tensor):
                    value.zero_()  # the step count too: bias correction starts over, as for a fresh group
        started += 1
    return started


def _stepped_parameters(optimizer: Any, torch_optimizer: Any, index: int) -> list[torch.Tensor]:
    """The tensors the torch optimizer keeps state for in param group ``index``: ZeRO-1/2 leave their flat
    partition in the group; ZeRO-3 puts each of its sub-groups' flat partitions there only while it steps them."""
    stepped = list(torch_optimizer.param_groups[index]["params"])
    while optimizer is not None and optimizer is not torch_optimizer:
        flat, owner = getattr(optimizer, "fp32_partitioned_groups_flat", None), getattr(
            optimizer, "sub_group_to_group_id", None
        )
        if flat is not None and owner is not None:
            stepped += [partition for sub_group, partition in enumerate(flat) if owner[sub_group] == index]
        optimizer = getattr(optimizer, "optimizer", None)
    return stepped


class DeepSpeedStages:
    """One run's unfreeze stages under DeepSpeed: the staged param groups, their gradient hooks, each stage's start."""

    def __init__(self, wants: Callable[[int], set[str] | None], stage_steps: Iterable[int]) -> None:
        self.stages = names_by_stage(wants, stage_steps)
        self.names = {name for names in self.stages.values() for name in names}
        self._zeroed: GradientsZeroed | None = None

    def param_groups(
        self,
        model: torch.nn.Module,
        groups: Mapping[str, Iterable[str]],
        learning_rates: Mapping[str, float],
        base_learning_rate: float,
        weight_decay: float,
        next_step: int,
    ) -> list[dict[str, Any]]:
        """The staged param groups for the optimizer being built; the stages not started yet get zeroed gradients."""
        not_started = {name for at_step, names in self.stages.items() if at_step >= next_step for name in names}
        self._zeroed = GradientsZeroed(model, not_started)
        return staged_param_groups(
            model, self.stages, groups, learning_rates, base_learning_rate, weight_decay, next_step=next_step
        )

    def begin_step(
        self, step: int, optimizer: Any, scheduler: Any, learning_rates: Mapping[str, float], base_learning_rate: float
    ) -> str | None:
        """Start the stage at ``step``, if there is one; what to tell the user."""
        if step not in self.stages or self._zeroed is None:
            return None
        self._zeroed.release(self.stages[step])
        started = start_stage(optimizer, scheduler, step, learning_rates, base_learning_rate)
        return f"step {step}: unfroze {len(self.stages[step])} parameter(s) in {started} staged group(s)"

    def remove(self) -> None:
        if self._zeroed is not None:
            self._zeroed.remove()
