"""Functions run in spawned processes by distributed tests (spawn needs them importable by name)."""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from vlm_dpo_plugins.distributed import any_rank


def results_on_two_ranks(worker) -> dict:
    """``worker(rank, world_size, port, results)`` run on two gloo ranks; what each rank put in ``results``."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(2, port, results), nprocs=2, join=True)
    return dict(results)


def guards_on_two_ranks(rank: int, world_size: int, port: int, results) -> None:
    """Every two-rank guard scenario in one process group, since spawning ranks costs seconds each time."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = {
            "votes": (any_rank(rank == 1), any_rank(False)),
            "guarded_steps": _guarded_steps_with_nan_on_rank_one(rank),
            "checkpointing": _checkpointing_under_ddp(),
            "reward_baseline": _reward_baseline_on_two_ranks(rank),
        }
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _reward_baseline_on_two_ranks(rank: int) -> list[tuple[float, int]]:
    """MPO's baseline fed different rewards per rank, then a NaN on rank 1 alone."""
    from vlm_dpo_plugins.losses.mpo import RewardBaseline

    baseline = RewardBaseline()
    seen = []
    for rewards in ([0.1, 0.3] if rank == 0 else [0.5, 0.7], [1.0] if rank == 0 else [math.nan], [0.0]):
        baseline.update(torch.tensor(rewards))
        seen.append((baseline.mean, baseline.count))
    return seen


def _guarded_steps_with_nan_on_rank_one(rank: int) -> dict:
    """Identical replicas; rank 1 alone sees a NaN gradient, then a NaN loss, then holds a learning-rate back-off."""
    from vlm_dpo_plugins.guards.step import StepGuard
    from vlm_dpo_plugins.manager import create_plugin_manager

    manager = create_plugin_manager(load_entry_points=False)
    # Back-off on spikes only, so that the skips below leave the learning rate alone.
    config = manager.load_config({"guards": {"lr_backoff_factor": 0.5, "lr_backoff_on": ["spike"]}})
    manager.hook.vlm_dpo_configure(config=config)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = StepGuard(manager)
    inputs = torch.arange(6.0).reshape(2, 3)
    learning_rates_used: list[float] = []
    outcomes = []
    snapshots = [[parameter.detach().clone() for parameter in model.parameters()]]
    for step in range(4):
        loss = model(inputs).square().mean()
        loss.backward()
        if step == 1 and rank == 1:
            model.weight.grad[0, 0] = float("nan")
        if step == 2 and rank == 1:
            loss = torch.tensor(float("inf"))
        if step == 3 and rank == 1:
            manager.get_plugin("guards").backoff.trigger()

        def step_fn() -> None:
            learning_rates_used.append(optimizer.param_groups[0]["lr"])
            optimizer.step()

        outcome = guard.step(optimizer, {"language": list(model.parameters())}, loss, step, step_fn=step_fn)
        outcomes.append((outcome.skipped, outcome.reasons, outcome.learning_rate_scale))
        optimizer.zero_grad(set_to_none=True)
        snapshots.append([parameter.detach().clone() for parameter in model.parameters()])
    return {
        "outcomes": outcomes,
        "learning_rates_used": learning_rates_used,
        "snapshots": snapshots,
        "adam_steps": float(optimizer.state[model.weight]["step"]),
        "skipped_steps": manager.get_plugin("guards").skipped_steps,
    }


class _FrozenTowerModel(torch.nn.Module):
    """A frozen "vision tower" feeding a checkpointed trainable block, the LoRA + frozen ViT shape in miniature."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tower = torch.nn.Linear(4, 4).requires_grad_(False)
        self.block = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 1)
        self.use_reentrant = use_reentrant

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # What enable_input_require_grads does for PEFT: reentrant segments pass no gradient without it.
        hidden = self.tower(inputs).requires_grad_(True)
        hidden = checkpoint(self.block, hidden, use_reentrant=self.use_reentrant)
        return self.head(hidden).sum()


def _train_two_steps(use_reentrant: bool, ddp_kwargs: dict) -> str:
    model = torch.nn.parallel.DistributedDataParallel(_FrozenTowerModel(use_reentrant), **ddp_kwargs)
    try:
        for _ in range(2):
            model(torch.ones(2, 4)).backward()
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return "ok"


def _checkpointing_under_ddp() -> dict:
    from vlm_dpo_plugins.guards.checkpointing import checkpointing_plan
    from vlm_dpo_plugins.types import RunContext

    context = RunContext(framework="test", world_size=2, uses_peft=True, gradient_checkpointing=True)
    outcomes = {"reentrant, find_unused_parameters": _train_two_steps(True, {"find_unused_parameters": True})}
    for name, prefer_non_reentrant in (("plan", True), ("plan keeping reentrant", False)):
        plan = checkpointing_plan(context, frozen_parameters=True, prefer_non_reentrant=prefer_non_reentrant)
        # find_unused_parameters=True unless the plan says otherwise: what TRL sets for vision-language models.
        ddp_kwargs = {"find_unused_parameters": True, **plan.ddp_kwargs}
        outcomes[name] = _train_two_steps(plan.gradient_checkpointing_kwargs["use_reentrant"], ddp_kwargs)
    return outcomes


def ddp_teardown_on_two_ranks(rank: int, world_size: int, port: int, results) -> None:
    """A trained static-graph DDP wrapper held by a trainer in a reference cycle, with and without the release."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = _ddp_teardown()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _trainer_in_a_cycle() -> tuple[object, object]:
    """A trainer-like object after training, as the plugin trainer is: its callbacks point back at it."""
    import weakref
    from types import SimpleNamespace

    model = _FrozenTowerModel(use_reentrant=True)
    wrapper = torch.nn.parallel.DistributedDataParallel(model, static_graph=True)
    for _ in range(2):
        wrapper(torch.ones(2, 4)).backward()
    trainer = SimpleNamespace(model=model, model_wrapped=wrapper, accelerator=SimpleNamespace(_models=[wrapper]))
    trainer.callbacks = [SimpleNamespace(trainer=trainer)]
    return trainer, weakref.ref(wrapper)


def _ddp_teardown() -> dict:
    import gc

    from vlm_dpo_plugins.adapters.hf_trainer.ddp_teardown import release_ddp_wrapper

    gc.collect()
    gc.disable()  # no collection at a moment of the collector's choosing: the outcome is deterministic
    try:
        trainer, wrapper = _trainer_in_a_cycle()
        del trainer  # the framework's training function returns
        outlives_the_trainer = wrapper() is not None  # until a collection: at exit, after destroy_process_group
        gc.collect()
        trainer, wrapper = _trainer_in_a_cycle()
        released = release_ddp_wrapper(trainer)
        return {
            "outlives_the_trainer": outlives_the_trainer,
            "released": released,
            "freed": wrapper() is None,
            "model_wrapped_is_model": trainer.model_wrapped is trainer.model,
            "accelerator_models_unwrapped": [model is trainer.model for model in trainer.accelerator._models],
            "released_again": release_ddp_wrapper(trainer),
        }
    finally:
        gc.enable()
