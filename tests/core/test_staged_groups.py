"""Unfreeze stages as DeepSpeed needs them (``staged_groups.py``), on a plain torch AdamW: a staged group is inert
until its stage, then trains exactly as a param group added fresh at that step (the DDP and one-process route)."""

from __future__ import annotations

import torch
from transformers import get_linear_schedule_with_warmup

from vlm_dpo_plugins.adapters.hf_trainer.staged_groups import (
    STAGE_KEY,
    GradientsZeroed,
    names_by_stage,
    staged_param_groups,
    start_stage,
)

RATE = 0.05


def test_each_stage_holds_the_names_that_start_training_there():
    wants = {0: {"a"}, 2: {"a", "b"}, 5: {"a", "b", "c", "d"}}
    stages = names_by_stage(lambda step: wants[max(s for s in wants if s <= step)], [2, 5])
    assert stages == {2: {"b"}, 5: {"c", "d"}}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))


def loss(network: torch.nn.Module, step: int) -> torch.Tensor:
    inputs = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
    return network(inputs).pow(2).mean()


def test_a_staged_group_is_inert_until_its_stage_then_trains_as_a_group_added_fresh():
    staged, fresh = model(), model()
    stages = {1: {"1.weight", "1.bias"}}
    groups = {"language": ["0.weight", "0.bias"], "projector": ["1.weight", "1.bias"]}
    first = {"params": list(staged[0].parameters()), "lr": RATE, "weight_decay": 0.1, "group": "language"}
    later = staged_param_groups(staged, stages, groups, {}, RATE, weight_decay=0.1, next_step=0)
    assert [(group["group"], group["lr"], group[STAGE_KEY]) for group in later] == [
        ("projector", 0.0, 1),
        ("projector", 0.0, 1),
    ]  # matrices decay, biases do not: one group each
    optimizer = torch.optim.AdamW([first, *later])
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=10)
    zeroed = GradientsZeroed(staged, stages[1])

    reference = torch.optim.AdamW(
        [{"params": list(fresh[0].parameters()), "lr": RATE, "weight_decay": 0.1, "group": "language"}]
    )
    reference_scheduler = get_linear_schedule_with_warmup(reference, num_warmup_steps=0, num_training_steps=10)
    for parameter in fresh[1].parameters():
        parameter.requires_grad_(False)

    before = [p.detach().clone() for p in staged[1].parameters()]
    for step in range(3):
        if step == 1:
            zeroed.release(stages[1])
            assert start_stage(optimizer, scheduler, 1, {}, RATE) == 2
            for parameter in fresh[1].parameters():
                parameter.requires_grad_(True)
            factor = reference_scheduler.lr_lambdas[0](reference_scheduler.last_epoch)
            for decays, parameter in ((True, fresh[1].weight), (False, fresh[1].bias)):
                entry = {"params": [parameter], "lr": RATE * factor, "initial_lr": RATE}
                reference.add_param_group({**entry, "weight_decay": 0.1 if decays else 0.0})
                reference_scheduler.base_lrs.append(RATE)
                reference_scheduler.lr_lambdas.append(reference_scheduler.lr_lambdas[0])
        for network, stepped, schedule in ((staged, optimizer, scheduler), (fresh, reference, reference_scheduler)):
            loss(network, step).backward()
            stepped.step()
            schedule.step()
            stepped.zero_grad(set_to_none=True)
        if step == 0:
            # Rate 0 and a zero gradient: AdamW's update and its decoupled weight decay move nothing.
            assert all(torch.equal(old, new) for old, new in zip(before, staged[1].parameters()))
    for mine, theirs in zip(staged.parameters(), fresh.parameters()):
        assert torch.equal(mine, theirs)
