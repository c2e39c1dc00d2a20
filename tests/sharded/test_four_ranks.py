"""Four ranks, standing for two nodes of two, through ``VLMDPOTrainer.train()`` under DeepSpeed ZeRO-3 on CPU.

Rows read in order, one per rank: the odd ranks only ever get text-only pairs (the vision lockstep at work on
two of four ranks), and at optimizer step 1 the last rank, the second rank of the "second node", gets a NaN in
one gradient. DeepSpeed's own overflow check skips that step on every rank; the guards count it once, and the
ranks end with the same weights. (DDP over two torchrun "nodes": tests/adapters/trl/test_ddp.py; FSDP2:
test_fsdp2.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("trl")

from rank_processes import run_ranks  # noqa: E402

from vlm_dpo_plugins.tiny import build_tiny_llava  # noqa: E402

WORKER = Path(__file__).with_name("mixed_batch_worker.py")
WORLD_SIZE = 4


def test_a_nan_on_the_second_node_is_skipped_on_all_four_zero3_ranks(tmp_path, master_port, monkeypatch):
    model_dir = build_tiny_llava(tmp_path / "model")
    monkeypatch.setenv("VLM_DPO_TEST_NAN_RANK", str(WORLD_SIZE - 1))
    arguments = [str(model_dir), str(tmp_path / "out"), "plugins", "zero3", "language"]
    run = run_ranks(WORKER, arguments, master_port, timeout=500, world_size=WORLD_SIZE)
    assert set(run.results) == set(range(WORLD_SIZE)), run.output[-4000:]
    checksums = set()
    for rank, result in run.results.items():
        assert result["skipped"] == [False, True, False], (rank, result)
        assert result["deepspeed_skipped"] == 1
        checksums.add(result["checksum"])
        # Policy and reference pass each step; only the text-only (odd) ranks need the stand-in.
        assert result["stand_in_encodes"] == (6 if rank % 2 else 0), (rank, result)
    assert len(checksums) == 1
