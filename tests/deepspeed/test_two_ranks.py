"""Two ZeRO-2 bf16 ranks, NaN on rank 0 only: DeepSpeed skips on both ranks, so each rank's guard counts one skip."""

from __future__ import annotations

from pathlib import Path

import pytest
from rank_processes import run_ranks

pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("zero2_rank_worker.py")


def test_a_nan_on_one_rank_is_skipped_and_counted_on_both(master_port):
    run = run_ranks(WORKER, [], master_port, timeout=240)
    assert set(run.results) == {0, 1}, run.output[-3000:]
    results = run.results

    expected_steps = [
        {"skipped": 0, "weights_changed": True},
        {"skipped": 1, "weights_changed": False},  # rank 1's gradients were finite, and it skipped too
        {"skipped": 0, "weights_changed": True},
    ]
    assert results[0]["steps"] == results[1]["steps"] == expected_steps
    assert results[0]["finite"] and results[1]["finite"]
    assert results[0]["checksum"] == results[1]["checksum"]  # the ranks did not drift apart
