"""Two ZeRO-2 bf16 ranks, NaN on rank 0 only: DeepSpeed skips on both ranks, so each rank's guard counts one skip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("zero2_rank_worker.py")


def test_a_nan_on_one_rank_is_skipped_and_counted_on_both(master_port):
    base = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), OMP_NUM_THREADS="1")
    ranks = [
        subprocess.Popen(
            [sys.executable, str(WORKER)],
            env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for process in ranks:
            outputs.append(process.communicate(timeout=240)[0])
    finally:
        for process in ranks:
            process.kill()
    results = {}
    for output in outputs:
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        assert lines, output[-3000:]
        result = json.loads(lines[-1].removeprefix("RESULT "))
        results[result.pop("rank")] = result

    expected_steps = [
        {"skipped": 0, "weights_changed": True},
        {"skipped": 1, "weights_changed": False},  # rank 1's gradients were finite, and it skipped too
        {"skipped": 0, "weights_changed": True},
    ]
    assert results[0]["steps"] == results[1]["steps"] == expected_steps
    assert results[0]["finite"] and results[1]["finite"]
    assert results[0]["checksum"] == results[1]["checksum"]  # the ranks did not drift apart
