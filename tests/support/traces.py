"""Per-step traces of real training runs, stored as fixtures and reproduced bit for bit.

A trace is what a run's logs and weights say about every step: the loss, the rewards and
log-probs, the gradient norm, the guards' skip counter, and a digest of the trained weights
at the end. The fixtures in ``tests/fixtures/traces/`` were recorded before the adapters were
rebuilt around one shared DPO step; a refactor that changes any number, however slightly (an
operation reordered, a metric gathered differently, a step skipped or not), changes the trace.

Record again deliberately, when a change is meant to alter the numbers:
``VLM_DPO_RECORD_TRACES=1 pytest -k trace`` in each framework's environment, and say why in the commit.

Bit for bit holds on one kind of machine only: the same torch gives fp32 results that differ in the last bits
from one CPU to another (MKL and oneDNN pick kernels by instruction set; ~1e-7 relative at step 0, grown by the
optimizer after). So a fixture holds one recording per machine kind (``machine_kind``: CPU model, instruction
sets, torch and its math libraries). On a kind with a recording the run must reproduce it exactly. On a kind
without one the run is compared with the first recording within ``OTHER_MACHINE_TOLERANCE`` (relative to the
value's size, at least 1) and the weight digest is not compared; a warning says so. Record there to make the
check exact on that kind too: recording adds or replaces this kind's entry and keeps the others. The first
recording (without a ``machine``) was taken before the adapters were rebuilt; the later ones were recorded from
code that reproduced it exactly on its own machine kind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import warnings
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

TRACE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "traces"
RECORD_VARIABLE = "VLM_DPO_RECORD_TRACES"
TRACED_KEYS = (
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "vlm_dpo/skipped_steps",
)


def step_trace(log_entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The traced values of every per-step training entry (those with a ``loss``), in order."""
    return [
        {key: entry[key] for key in ("step", *TRACED_KEYS) if key in entry}
        for entry in log_entries
        if "loss" in entry and "train_runtime" not in entry
    ]


def weights_digest(tensors: Mapping[str, Any]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(dtype=_byte_dtype()).numpy().tobytes())
    return digest.hexdigest()


def saved_weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no *.safetensors in {folder}"
    tensors: dict[str, Any] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


OTHER_MACHINE_TOLERANCE = 1e-4
"""Relative (to ``max(1, |value|)``) difference allowed against a recording from another machine kind: the
~1e-7 kernel rounding of step 0 grows to ~1e-6 relative in log-probs after AdamW steps (2e-4 on a log-prob of 84)."""


class OtherMachineTrace(UserWarning):
    """The trace was compared within a tolerance: it has no recording from this kind of machine."""


@cache
def machine_kind() -> str:
    """What decides the last bits of fp32 kernels here: CPU model and instruction sets, torch and its math libraries."""
    import torch

    cpu, flags = platform.processor(), ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    for line in cpuinfo:  # the first processor's lines: every core of one machine is the same model
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name":
            cpu = value
        elif key == "flags":
            flags = " ".join(sorted(f for f in value.split() if f.startswith(("avx", "amx", "fma", "sse4"))))
            break
    build = torch.__config__.show().splitlines()
    libraries = [line.strip() for line in build if "Math Kernel" in line or "DNN" in line]
    capability = torch.backends.cpu.get_cpu_capability()
    text = "|".join([platform.machine(), cpu, flags, torch.__version__, capability, *libraries])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _recordings(path: Path) -> list[dict[str, Any]]:
    stored = json.loads(path.read_text())
    if "recordings" in stored:
        return stored["recordings"]
    return [{"machine": None, "steps": stored["steps"], "weights_sha256": stored["weights_sha256"]}]


def _this_machines(recordings: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((recording for recording in recordings if recording["machine"] == machine_kind()), None)


def check_trace(name: str, steps: list[dict[str, Any]], weights: str) -> None:
    """Compare with the stored trace ``name`` (exactly, on a machine kind it was recorded on); with
    ``VLM_DPO_RECORD_TRACES=1``, store this machine kind's recording instead."""
    trace = {"machine": machine_kind(), "steps": _exact(steps), "weights_sha256": weights}
    path = TRACE_DIR / f"{name}.json"
    if os.environ.get(RECORD_VARIABLE) == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        others = [r for r in _recordings(path) if r["machine"] != trace["machine"]] if path.exists() else []
        path.write_text(json.dumps({"recordings": [*others, trace]}, indent=1, sort_keys=True) + "\n")
        return
    assert path.exists(), f"no stored trace {path}: record it with {RECORD_VARIABLE}=1"
    recordings = _recordings(path)
    stored = _this_machines(recordings)
    if stored is None and any(_same_run(trace, recording) for recording in recordings):
        return  # a machine kind whose recording has no ``machine`` key: bit for bit all the same
    if stored is None:
        _within(steps, recordings[0]["steps"], OTHER_MACHINE_TOLERANCE, relative=True)
        warnings.warn(
            OtherMachineTrace(
                f"{path.name} has no recording from this machine kind ({machine_kind()}): "
                f"compared within {OTHER_MACHINE_TOLERANCE} relative, weights not compared; "
                f"record it here with {RECORD_VARIABLE}=1 to compare bit for bit"
            )
        )
        return
    assert len(trace["steps"]) == len(stored["steps"]), (trace["steps"], stored["steps"])
    for index, (now, then) in enumerate(zip(trace["steps"], stored["steps"], strict=True)):
        # As JSON text: NaN (a skipped step's gradient norm) equals itself there, and every digit counts.
        now, then = json.dumps(now, sort_keys=True), json.dumps(then, sort_keys=True)
        assert now == then, f"step entry {index} differs from {path.name}:\nnow    {now}\nstored {then}"
    assert trace["weights_sha256"] == stored["weights_sha256"], f"the trained weights differ from {path.name}"


def _same_run(trace: dict[str, Any], recording: dict[str, Any]) -> bool:
    return recording["machine"] is None and (
        json.dumps(trace["steps"], sort_keys=True) == json.dumps(recording["steps"], sort_keys=True)
        and trace["weights_sha256"] == recording["weights_sha256"]
    )


def follows_trace(name: str, steps: list[dict[str, Any]], tolerance: float) -> float:
    """Compare with the stored trace ``name`` value by value within ``tolerance`` (absolute); the largest difference.

    For a change meant to alter rounding only (another attention kernel): the recorded run is still reproduced bit
    for bit by its own configuration, and the new computation is shown to follow it. Without a recording from this
    machine kind, the other kind's rounding is allowed on top (``OTHER_MACHINE_TOLERANCE``).
    """
    recordings = _recordings(TRACE_DIR / f"{name}.json")
    stored = _this_machines(recordings)
    if stored is None:
        return _within(steps, recordings[0]["steps"], OTHER_MACHINE_TOLERANCE, relative=True, plus=tolerance)
    return _within(steps, stored["steps"], tolerance)


def _within(
    steps: list[dict[str, Any]], stored: list[dict[str, Any]], tolerance: float, relative: bool = False, plus: float = 0
) -> float:
    assert len(steps) == len(stored), (steps, stored)
    largest = 0.0
    for index, (now, then) in enumerate(zip(_exact(steps), stored, strict=True)):
        assert now.keys() == then.keys(), (now, then)
        for key, value in now.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(then[key]), (key, now, then)
                continue
            difference = abs(value - then[key])
            allowed = tolerance * (max(1.0, abs(then[key])) if relative else 1.0) + plus
            assert difference <= allowed, f"step entry {index}: {key} is {value}, recorded {then[key]}"
            largest = max(largest, difference)
    return largest


def _exact(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Through JSON and back, so a freshly computed trace compares with a stored one value for value.
    return json.loads(json.dumps(steps))


def _byte_dtype():
    import torch

    return torch.uint8
