"""Per-step traces of real training runs, stored as fixtures and reproduced bit for bit.

A trace is what a run's logs and weights say about every step: the loss, the rewards and
log-probs, the gradient norm, the guards' skip counter, and a digest of the trained weights
at the end. The fixtures in ``tests/fixtures/traces/`` were recorded before the adapters were
rebuilt around one shared DPO step; a refactor that changes any number, however slightly (an
operation reordered, a metric gathered differently, a step skipped or not), changes the trace.

Record again deliberately, when a change is meant to alter the numbers:
``VLM_DPO_RECORD_TRACES=1 pytest -k trace`` in each framework's environment, and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
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


def check_trace(name: str, steps: list[dict[str, Any]], weights: str) -> None:
    """Compare with the stored trace ``name`` exactly; with ``VLM_DPO_RECORD_TRACES=1``, store it instead."""
    trace = {"steps": _exact(steps), "weights_sha256": weights}
    path = TRACE_DIR / f"{name}.json"
    if os.environ.get(RECORD_VARIABLE) == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(trace, indent=1, sort_keys=True) + "\n")
        return
    assert path.exists(), f"no stored trace {path}: record it with {RECORD_VARIABLE}=1"
    stored = json.loads(path.read_text())
    assert len(trace["steps"]) == len(stored["steps"]), (trace["steps"], stored["steps"])
    for index, (now, then) in enumerate(zip(trace["steps"], stored["steps"], strict=True)):
        # As JSON text: NaN (a skipped step's gradient norm) equals itself there, and every digit counts.
        now, then = json.dumps(now, sort_keys=True), json.dumps(then, sort_keys=True)
        assert now == then, f"step entry {index} differs from {path.name}:\nnow    {now}\nstored {then}"
    assert trace["weights_sha256"] == stored["weights_sha256"], f"the trained weights differ from {path.name}"


def follows_trace(name: str, steps: list[dict[str, Any]], tolerance: float) -> float:
    """Compare with the stored trace ``name`` value by value within ``tolerance`` (absolute); the largest difference.

    For a change meant to alter rounding only (another attention kernel): the recorded run is still reproduced bit
    for bit by its own configuration, and the new computation is shown to follow it.
    """
    import math

    stored = json.loads((TRACE_DIR / f"{name}.json").read_text())["steps"]
    assert len(steps) == len(stored), (steps, stored)
    largest = 0.0
    for index, (now, then) in enumerate(zip(_exact(steps), stored, strict=True)):
        assert now.keys() == then.keys(), (now, then)
        for key, value in now.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(then[key]), (key, now, then)
                continue
            difference = abs(value - then[key])
            assert difference <= tolerance, f"step entry {index}: {key} is {value}, recorded {then[key]}"
            largest = max(largest, difference)
    return largest


def _exact(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Through JSON and back, so a freshly computed trace compares with a stored one value for value.
    return json.loads(json.dumps(steps))


def _byte_dtype():
    import torch

    return torch.uint8
