"""Live DeepSpeed ZeRO 1-3 on CPU: tuned buckets read back from the engine, and DeepSpeed's own non-finite skips.

One process, gloo, a 33,736-parameter MLP of width 64, so every tuned value differs
from DeepSpeed's defaults and can be worked out by hand: reduce/allgather bucket
min(max(64^2, 1e6), ceiling, 33736) = 33736; prefetch 0.9 x 64^2 = 3686.4 -> 3686;
persistence threshold 10 x 64 = 640.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlm_dpo_plugins.errors import TrainingHalted
from vlm_dpo_plugins.guards.deepspeed import PLUGIN_NAME, DeepSpeedTuning, tune_deepspeed_config
from vlm_dpo_plugins.guards.deepspeed_skips import DeepSpeedStepSkips, deepspeed_skips_nonfinite_steps
from vlm_dpo_plugins.guards.step import StepGuard
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import RunContext

pytest.importorskip("deepspeed")

WIDTH = 64
PARAMETERS = 33_736  # 64*256+256 + 256*64+64 + 2*64 + 64*8+8
POISONED = "2.weight"  # the gradient that turns NaN, as one bf16 overflow in one layer would


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(WIDTH, 256), nn.GELU(), nn.Linear(256, WIDTH), nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 8)
    )


def user_config(stage: int, dtype: str, **extra) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        # torch's AdamW: DeepSpeed's default FusedAdam would JIT-compile a CPU kernel first.
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        # "auto" as transformers' example configs write it: DeepSpeed itself cannot read it, so the engine only
        # builds if the merge filled it (at stage 0 nothing fills it, so it is left out there).
        "zero_optimization": {"stage": stage, "reduce_bucket_size": "auto"} if stage else {"stage": 0},
    }
    if dtype != "fp32":
        config[dtype] = {"enabled": True}
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    return config


def tuning_manager(config=None):
    manager = create_plugin_manager(load_entry_points=False)
    if not manager.has_plugin(PLUGIN_NAME):  # until manager.builtin_plugins() registers it
        manager.register(DeepSpeedTuning(), name=PLUGIN_NAME)
    manager.hook.vlm_dpo_configure(config=manager.load_config(config or {}))
    return manager


def build_engine(deepspeed, stage: int, dtype: str, manager=None, **extra):
    model = tiny_mlp()
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS
    context = RunContext(framework="deepspeed", uses_deepspeed=True, deepspeed_stage=stage, mixed_precision=dtype)
    merge = tune_deepspeed_config(
        manager or tuning_manager(),
        user_config(stage, dtype, **extra),
        trainable_parameters=PARAMETERS,
        hidden_size=WIDTH,
        context=context,
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=merge.config,
        # The LR factor changes every step, so a scheduler that advanced shows in the learning rate too.
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step)),
    )
    return engine, scheduler, merge


def train_step(engine, poison: bool = False) -> float:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(2, WIDTH, generator=generator).to(engine.device, next(engine.module.parameters()).dtype)
    handle = None
    if poison:
        weight = dict(engine.module.named_parameters())[POISONED]
        handle = weight.register_hook(lambda grad: grad.index_fill(0, torch.tensor([0]), float("nan")))
    loss = engine(inputs).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    if handle is not None:
        handle.remove()
    return loss.item()


def snapshot(engine, scheduler) -> dict:
    """Everything a skipped step must leave bit-identical: module weights, fp32 master weights, Adam state, LR."""
    inner = engine.optimizer.optimizer  # the torch AdamW that ZeRO drives over its fp32 partitions
    state = {"lr": inner.param_groups[0]["lr"], "scheduler_epoch": scheduler.last_epoch}
    for name, parameter in engine.module.named_parameters():
        local = getattr(parameter, "ds_tensor", parameter)  # ZeRO-3 keeps only this rank's shard
        state[f"module.{name}"] = local.detach().clone()
    # ZeRO 1-2 keep one flat fp32 partition per group; ZeRO-3 one per sub-group, lent to the inner AdamW per step.
    masters = getattr(engine.optimizer, "single_partition_of_fp32_groups", None)
    if masters is None:
        masters = engine.optimizer.fp32_partitioned_groups_flat
    for index, master in enumerate(masters):
        state[f"master.{index}"] = master.detach().clone()
        for key, value in inner.state.get(master, {}).items():
            state[f"adam.{index}.{key}"] = value.detach().clone() if torch.is_tensor(value) else value
    return state


def assert_bit_identical(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if torch.is_tensor(value):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


# -- bucket sizes, read back from the live engine ----------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_one_and_two_buckets_reach_the_zero_optimizer(deepspeed_process_group, stage):
    engine, _, merge = build_engine(deepspeed_process_group, stage, "bf16")
    assert [str(change) for change in merge.changes] == [
        "zero_optimization.reduce_bucket_size: 'auto' -> 33736",
        "zero_optimization.allgather_bucket_size: unset -> 33736",
    ]
    assert type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"
    assert engine.optimizer.reduce_bucket_size == 33_736  # DeepSpeed's default: 500,000,000
    assert engine.optimizer.allgather_bucket_size == 33_736
    assert math.isfinite(train_step(engine))


def test_an_odd_parameter_count_gives_a_bucket_deepspeed_accepts(deepspeed_process_group):
    model = nn.Linear(4, 3)  # 15 parameters; DeepSpeed asserts allgather_bucket_size % 2 == 0
    context = RunContext(framework="deepspeed", uses_deepspeed=True, mixed_precision="bf16")
    merge = tune_deepspeed_config(
        tuning_manager(), user_config(2, "bf16"), trainable_parameters=15, hidden_size=4, context=context
    )
    engine, _, _, _ = deepspeed_process_group.initialize(
        model=model, model_parameters=model.parameters(), config=merge.config
    )
    assert engine.optimizer.allgather_bucket_size == engine.optimizer.reduce_bucket_size == 16


def test_stage_three_buckets_prefetch_and_persistence_reach_the_engine(deepspeed_process_group):
    engine, _, _ = build_engine(deepspeed_process_group, 3, "bf16")
    optimizer = engine.optimizer
    assert type(optimizer).__name__ == "DeepSpeedZeroOptimizer_Stage3"
    assert optimizer.reduce_bucket_size == 33_736
    assert optimizer.parameter_offload._prefetch_bucket_sz == 3_686  # default 50,000,000
    assert optimizer.parameter_offload.param_numel_persistence_threshold == 640  # default 100,000
    # The threshold acts: tensors of at most 640 elements stay whole, the two 64x256 matrices are partitioned.
    persistent = {name for name, parameter in engine.module.named_parameters() if parameter.ds_persist}
    assert persistent == {"0.bias", "2.bias", "3.weight", "3.bias", "4.weight", "4.bias"}
    assert math.isfinite(train_step(engine))


# -- DeepSpeed's own non-finite skip ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "dtype"), [(1, "bf16"), (2, "bf16"), (2, "fp32"), (3, "bf16")])
def test_deepspeed_skips_a_nan_gradient_itself_and_the_skip_is_counted(deepspeed_process_group, stage, dtype):
    engine, scheduler, _ = build_engine(deepspeed_process_group, stage, dtype)
    skips = DeepSpeedStepSkips(engine)
    assert deepspeed_skips_nonfinite_steps(engine)
    train_step(engine)
    assert skips.skipped_since_last_check() == 0
    before = snapshot(engine, scheduler)

    train_step(engine, poison=True)

    assert skips.skipped_since_last_check() == 1
    assert skips.skipped_since_last_check() == 0  # counted once, not again at the next check
    assert skips.grad_norm() == math.inf
    assert_bit_identical(before, snapshot(engine, scheduler))  # weights, Adam moments and step, LR schedule

    train_step(engine)  # training goes on: the next clean step is taken and the schedule advances
    assert skips.skipped_since_last_check() == 0
    after = snapshot(engine, scheduler)
    assert after["scheduler_epoch"] == before["scheduler_epoch"] + 1
    assert not torch.equal(after["master.0"], before["master.0"])
    assert all(torch.isfinite(value).all() for key, value in after.items() if key.startswith("master."))


def test_the_step_guard_counts_deepspeeds_skip_without_stepping_again(deepspeed_process_group):
    manager = tuning_manager({"guards": {"max_consecutive_skips": 2}})
    engine, scheduler, _ = build_engine(deepspeed_process_group, 2, "bf16", manager=manager)
    skips, guard = DeepSpeedStepSkips(engine), StepGuard(manager)

    loss = train_step(engine)
    assert not guard.step(None, None, loss, 0, **skips.guard_step_arguments()).skipped
    before = snapshot(engine, scheduler)
    loss = train_step(engine, poison=True)
    outcome = guard.step(None, None, loss, 1, **skips.guard_step_arguments())

    assert outcome.skipped and outcome.reasons == ("non-finite gradient norm; skipped by DeepSpeed",)
    assert_bit_identical(before, snapshot(engine, scheduler))  # the guard did not step in DeepSpeed's place
    metrics = {key: value for result in manager.hook.vlm_dpo_metrics(step=1) for key, value in result.items()}
    assert metrics["vlm_dpo/skipped_steps"] == 1.0
    loss = train_step(engine, poison=True)
    with pytest.raises(TrainingHalted, match="2 consecutive optimizer steps skipped"):
        guard.step(None, None, loss, 2, **skips.guard_step_arguments())


@pytest.mark.parametrize(
    ("stage", "dtype", "extra"),
    [
        (2, "bf16", {"bf16": {"check_grad_overflow": False}}),  # its only remaining check is off for bf16
        (0, "fp32", {}),  # ZeRO off: DeepSpeed drives the plain torch AdamW, which checks nothing
    ],
)
def test_where_deepspeed_does_not_check_the_nan_reaches_the_weights(deepspeed_process_group, stage, dtype, extra):
    engine, _, merge = build_engine(deepspeed_process_group, stage, dtype, **extra)
    if "bf16" in extra:
        assert "bf16.check_grad_overflow is false" in merge.report()
    skips = DeepSpeedStepSkips(engine)
    assert not deepspeed_skips_nonfinite_steps(engine)

    train_step(engine, poison=True)

    assert skips.skipped_since_last_check() == 0
    assert torch.isnan(dict(engine.module.named_parameters())[POISONED]).any()


def test_an_fp16_skip_is_reported_as_a_loss_scale_overflow(deepspeed_process_group, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed's CPU accelerator allows fp16 only where oneDNN has fp16 kernels (AVX512-FP16/AMX CPUs). torch runs
    # the tiny model's fp16 ops on any CPU, and what is tested is the loss scaler's skip, not the kernels' speed.
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)
    engine, _, _ = build_engine(deepspeed_process_group, 2, "fp16", fp16={"initial_scale_power": 4})
    skips = DeepSpeedStepSkips(engine)
    train_step(engine, poison=True)
    arguments = skips.guard_step_arguments()
    assert arguments["framework_skipped"] is True
    assert arguments["framework_reason"] == (
        f"DeepSpeed fp16 loss-scale overflow (loss scale now {engine.optimizer.loss_scale}); skipped by DeepSpeed"
    )


def test_the_probe_refuses_what_is_not_an_engine():
    with pytest.raises(TypeError, match="Linear is not a DeepSpeed engine"):
        DeepSpeedStepSkips(nn.Linear(1, 1))
