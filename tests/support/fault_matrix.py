"""The reliability suites' fault matrix: the faults, where they land, and what a handled fault leaves behind.

Every framework's suite runs each fault of ``fault_plugin.FAULTS`` once, at a step drawn from a seed (a spike can
only be judged once the loss window is full, so the draw starts after it), with a checkpoint after every step.
A handled fault is a skipped step: the checkpoints on either side of it hold identical weights, optimizer state
and LR-scheduler position, the run's logs count one skip and name its cause, and training goes on afterwards.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import torch
from fault_plugin import FAULTS, random_step
from safetensors.torch import load_file

SPIKE_WINDOW = 3
GUARDS = {"spike_window": SPIKE_WINDOW, "skip_spikes": True}
"""A short loss window so a spike can be judged early, and spikes skipped like non-finite steps."""

SKIP_LINE = "optimizer step skipped on every rank"
REASONS = {
    "loss-nan": "non-finite loss (nan)",
    "loss-inf": "non-finite loss (inf)",
    "grad-nan": "non-finite gradient norm (nan)",
    "grad-inf": "non-finite gradient norm (inf)",
    "logits-nan": "non-finite loss (nan)",
    "pixel-nan": "non-finite loss (nan)",
    "spike": "loss spike (",
}
assert set(REASONS) == set(FAULTS)

CONSECUTIVE = "consecutive"
"""The matrix row for K faults in a row: a checkpoint, then a halt naming the cause and the settings."""
HALT_MESSAGE = "2 consecutive optimizer steps skipped"
HALT_SETTING = "guards.max_consecutive_skips sets this limit"


def assert_skip_logged_once(output: str, *expected: str) -> None:
    """Exactly one "optimizer step skipped on every rank" line in the run's output, holding each expected text."""
    lines = [line for line in output.splitlines() if SKIP_LINE in line]
    assert len(lines) == 1 and all(text in lines[0] for text in expected), (lines, expected)


def assert_fault_skipped_once(output: str, fault: str, at: int) -> None:
    """One skip line, for the step the fault hit, naming the fault's cause."""
    assert_skip_logged_once(output, f"step {at}:", REASONS[fault])


def assert_one_rank_fault_skipped_on_both(output: str) -> None:
    """One skip line, naming rank 1's non-finite loss and no reason of rank 0's (it saw nothing, and skipped)."""
    assert_skip_logged_once(output, "rank 1: non-finite loss (nan)")
    assert "rank 0:" not in next(line for line in output.splitlines() if SKIP_LINE in line)


def fault_step(fault: str) -> int:
    """The 0-based optimizer step ``fault`` hits: drawn from the fault's name, after the spike window fills."""
    return random_step(zlib.crc32(fault.encode()), SPIKE_WINDOW, SPIKE_WINDOW + 1)


def skipped_steps_logged(fault_at: int) -> list[float]:
    """``vlm_dpo/skipped_steps`` as logged after each step of a run that ends two steps after the fault."""
    return [0.0] * fault_at + [1.0, 1.0]


def _same(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (folder / name).exists():
            return load_file(folder / name)
    raise AssertionError(f"no weights in {folder}: {sorted(path.name for path in folder.iterdir())}")


def assert_step_changed_nothing(output_dir: Path, fault_at: int) -> None:
    """Checkpoints ``fault_at`` (before the faulty step) and ``fault_at + 1`` (after it) hold the same state.

    And the step after it trained, to finite weights.
    """
    folders = [output_dir / f"checkpoint-{step}" for step in (fault_at, fault_at + 1, fault_at + 2)]
    weights = [_weights(folder) for folder in folders]
    optimizers = [torch.load(folder / "optimizer.pt", weights_only=False) for folder in folders]
    schedules = [torch.load(folder / "scheduler.pt", weights_only=False)["last_epoch"] for folder in folders]
    assert _same(weights[0], weights[1]), "the skipped step changed the weights"
    before, after = optimizers[0]["state"], optimizers[1]["state"]
    assert before.keys() == after.keys() and all(_same(before[i], after[i]) for i in before), (
        "the skipped step moved the optimizer state"
    )
    assert [group["lr"] for group in optimizers[0]["param_groups"]] == [
        group["lr"] for group in optimizers[1]["param_groups"]
    ]
    assert schedules[0] == schedules[1] == fault_at and schedules[2] == fault_at + 1, schedules  # schedule held
    assert not _same(weights[1], weights[2]), "training did not continue after the skipped step"
    assert all(torch.isfinite(tensor).all() for tensor in weights[2].values()), "non-finite weights after the skip"


def assert_halt_checkpoint(message: str, output_dir: Path, last_fault_at: int, skipped: int) -> None:
    """The halt names its checkpoint: the Trainer's folder for the step it stopped at, with the skip counter in it."""
    folder = output_dir / f"checkpoint-{last_fault_at}"
    assert f"A checkpoint was saved to {folder}: it holds the weights of the last step taken" in message, message
    weights = _weights(folder)
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    state = json.loads((folder / "vlm_dpo_plugins_state.rank0.json").read_text())
    assert state["guards"]["skipped_steps"] == skipped, state["guards"]


KILL_ROWS = {"step": "kill-step", "save": "kill-save"}
"""The matrix rows for a run killed (SIGKILL) during a step / while writing a checkpoint, then resumed."""
KILL_LINE = "[test_fault_injection] SIGKILL"


def assert_resumed_exactly(resumed_dir: Path, reference_dir: Path, last_step: int) -> None:
    """The resumed run's last checkpoint holds what the uninterrupted run's does: weights, optimizer, schedule,
    and the plugins' own state (a skip counter that started before the interruption, detector state...)."""
    resumed, reference = resumed_dir / f"checkpoint-{last_step}", reference_dir / f"checkpoint-{last_step}"
    assert _same(_weights(resumed), _weights(reference)), "the resumed run ended with other weights"
    optimizers = [torch.load(folder / "optimizer.pt", weights_only=False) for folder in (resumed, reference)]
    assert optimizers[0]["state"].keys() == optimizers[1]["state"].keys()
    assert all(_same(optimizers[0]["state"][i], optimizers[1]["state"][i]) for i in optimizers[0]["state"])
    schedules = [torch.load(folder / "scheduler.pt", weights_only=False) for folder in (resumed, reference)]
    assert schedules[0] == schedules[1]
    states = [json.loads((folder / "vlm_dpo_plugins_state.rank0.json").read_text()) for folder in (resumed, reference)]
    for state in states:
        # Counts of rows collated, not trained: accelerate's loader collates one batch ahead of the step, and a
        # resumed run collates the batch that was waiting at the checkpoint again (TRL; LLaMA-Factory's loader
        # does not). Findings and skipped rows, the part that matters, are compared.
        for ahead in ("next_row", "rows_checked"):
            state.get("collation", {}).pop(ahead, None)
    # Every plugin's state: guards (skip counter, spike window, back-off), detectors, collation findings.
    assert states[0] == states[1] and states[0]["guards"]["skipped_steps"] == 1, states


DISTRIBUTED_ROWS = ("one-rank-nan", "ddp-reentrant", "zero2", "zero3", "zero3-no-image", "fsdp2")
"""Two gloo ranks: a fault only one rank sees, and the DDP + LoRA + reentrant-checkpointing crash; DeepSpeed; a
ZeRO-3 rank without images; FSDP2."""
DDP_CRASH = "RuntimeError: Expected to mark a variable ready only once"


_WRITTEN = re.compile(r"zero_optimization\.(\w+): 'auto' -> (\d+)")
_LIVE = re.compile(r"DeepSpeed ZeRO-(\d) optimizer holds (.*)$")
_DEEPSPEED_DEFAULT = 500_000_000  # what the engine would use for an "auto" nothing filled


def zero_config(stage: int) -> dict:
    """A ZeRO config as transformers' examples write it: "auto" for the Trainer's values and for the buckets."""
    zero = {"stage": stage, "reduce_bucket_size": "auto"}
    zero["allgather_bucket_size" if stage == 2 else "stage3_prefetch_bucket_size"] = "auto"
    auto = dict.fromkeys(
        ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping"),
        "auto",
    )
    return {**auto, "zero_optimization": zero}


def deepspeed_environment() -> dict[str, str]:
    from framework_cli import torch_extensions_dir

    return {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": torch_extensions_dir()}


def assert_live_buckets_as_written(output: str, stage: int) -> None:
    """The sizes the plugins wrote over "auto" are the sizes the live ZeRO optimizer reports holding."""
    written = {key: int(value) for key, value in _WRITTEN.findall(output)}
    expected = {"reduce_bucket_size", "allgather_bucket_size" if stage == 2 else "stage3_prefetch_bucket_size"}
    assert set(written) == expected and max(written.values()) < _DEEPSPEED_DEFAULT / 1000, written
    (live,) = [match for line in output.splitlines() if (match := _LIVE.search(line))]
    held = {key: int(value) for key, value in (part.split() for part in live.group(2).split(", "))}
    assert int(live.group(1)) == stage and held == written, (live.group(0), written)


def assert_deepspeed_skipped_once(output: str, skipped_steps_logged: list[float]) -> None:
    """DeepSpeed skipped the NaN step itself, exactly once; the guards counted it once and did not step again."""
    assert output.count("OVERFLOW! Skipping step") == 1
    assert "skipped by DeepSpeed" in output
    assert skipped_steps_logged == [0, 1, 1], skipped_steps_logged
