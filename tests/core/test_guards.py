"""Stability guards: clipping, skip votes, the consecutive-skip halt, state, and rank agreement over gloo."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp
from rank_workers import vote_to_skip_on_rank_one

from vlm_dpo_plugins.distributed import any_rank
from vlm_dpo_plugins.errors import TrainingHalted
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import RunContext, StepSignals


@pytest.fixture
def manager():
    manager = create_plugin_manager(load_entry_points=False)
    manager.hook.vlm_dpo_configure(config=manager.load_config({"guards": {"max_consecutive_skips": 3}}))
    return manager


def reasons(manager, loss, grad_norm):
    return [r for r in manager.hook.vlm_dpo_skip_step_reason(signals=StepSignals(0, loss, grad_norm)) if r]


def test_clip_returns_the_pre_clip_norm_and_clips_in_place(manager):
    weight = torch.nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([3.0, 4.0])
    frozen = torch.nn.Parameter(torch.zeros(1))  # no grad: ignored, not an error
    norm = manager.hook.vlm_dpo_clip_gradients(parameters=[weight, frozen], max_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_non_finite_norm_is_reported_not_raised(manager):
    weight = torch.nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([float("nan"), 1.0])
    assert math.isnan(manager.hook.vlm_dpo_clip_gradients(parameters=[weight], max_norm=1.0))


@pytest.mark.parametrize(
    "loss, grad_norm, expected",
    [
        (0.69, 1.0, []),
        (float("nan"), 1.0, ["non-finite loss (nan)"]),
        (0.69, float("inf"), ["non-finite gradient norm (inf)"]),
        (0.69, None, []),
    ],
)
def test_skip_votes(manager, loss, grad_norm, expected):
    assert reasons(manager, loss, grad_norm) == expected


def test_skipping_can_be_switched_off():
    manager = create_plugin_manager(load_entry_points=False)
    manager.hook.vlm_dpo_configure(config=manager.load_config({"guards": {"skip_nonfinite": False}}))
    assert reasons(manager, float("nan"), 1.0) == []


def test_consecutive_skips_halt_with_cause_and_settings(manager):
    signals = StepSignals(step=7, loss=float("nan"), grad_norm=None)
    manager.hook.vlm_dpo_after_optimizer_step(signals=signals, skipped=True, reasons=["non-finite loss (nan)"])
    manager.hook.vlm_dpo_after_optimizer_step(signals=signals, skipped=False, reasons=[])  # a good step resets
    for _ in range(2):
        manager.hook.vlm_dpo_after_optimizer_step(signals=signals, skipped=True, reasons=["non-finite loss (nan)"])
    with pytest.raises(TrainingHalted, match=r"3 consecutive optimizer steps skipped .*step 7: non-finite loss.*guards.max_consecutive_skips"):
        manager.hook.vlm_dpo_after_optimizer_step(signals=signals, skipped=True, reasons=["non-finite loss (nan)"])
    assert manager.hook.vlm_dpo_metrics(step=7) == [{"vlm_dpo/skipped_steps": 4.0}]


def test_guard_state_survives_a_save_and_restore(manager):
    signals = StepSignals(step=1, loss=float("nan"), grad_norm=None)
    manager.hook.vlm_dpo_after_optimizer_step(signals=signals, skipped=True, reasons=["x"])
    saved = dict(pair for pair in manager.hook.vlm_dpo_state_dict() if pair)
    resumed = create_plugin_manager(load_entry_points=False)
    resumed.hook.vlm_dpo_load_state_dict(states=saved)
    assert resumed.hook.vlm_dpo_metrics(step=1) == [{"vlm_dpo/skipped_steps": 1.0}]
    assert dict(pair for pair in resumed.hook.vlm_dpo_state_dict() if pair) == saved


def test_gradient_checkpointing_is_non_reentrant_by_default(manager):
    context = RunContext(framework="test", world_size=2, uses_peft=True, gradient_checkpointing=True)
    assert manager.hook.vlm_dpo_gradient_checkpointing_kwargs(context=context) == {"use_reentrant": False}


def test_any_rank_outside_distributed_is_the_local_flag():
    assert any_rank(True) is True and any_rank(False) is False


def test_a_skip_on_one_rank_is_a_skip_on_every_rank():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(vote_to_skip_on_rank_one, args=(2, port, results), nprocs=2, join=True)
    assert dict(results) == {0: (True, False), 1: (True, False)}
