"""Unfreeze stages under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 through TRL's ``train()``, two CPU ranks, against DDP.

ZeRO partitions the optimizer when DeepSpeed starts, so the projector's stage sits in it from step 0 at rate 0 with
its gradients zeroed, then takes its rate and fresh AdamW state at its step (``adapters/hf_trainer/
staged_groups.py``). DDP and FSDP2 hold the projector and add it to the optimizer at the stage, as one process
does. Every route must train the same: the projector untouched before its stage, then the same losses and
weights. Rank 1's batches have no image (the mixed-batch worker), so under ZeRO-3 the vision lockstep runs too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("trl")

from framework_cli import free_port  # noqa: E402
from rank_processes import run_ranks  # noqa: E402

from vlm_dpo_plugins.tiny import build_tiny_llava  # noqa: E402

WORKER = Path(__file__).with_name("mixed_batch_worker.py")
GROUPS = "language+projector@1"  # the language model trains; the projector from step 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


def train(model_dir: Path, output_dir: Path, engine: str, port: int):
    # fsdp2: accelerate's real FSDP2 on these CPU ranks (tests/support/fsdp_on_cpu.py; test_fsdp2_through_trl.py).
    env = {"VLM_DPO_TEST_FSDP_ON_CPU": "1"} if engine == "fsdp2" else None
    run = run_ranks(WORKER, [str(model_dir), str(output_dir), "plugins", engine, GROUPS], port, timeout=300, env=env)
    assert set(run.results) == {0, 1}, run.output[-3000:]
    return run


@pytest.fixture(scope="module")
def ddp(model_dir, tmp_path_factory):
    return train(model_dir, tmp_path_factory.mktemp("ddp"), "ddp", free_port())


# FSDP2 holds the projector trainable from the start (its gradient dropped until the stage), as DDP does.
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_an_unfreeze_stage_under_zero_and_fsdp2_trains_as_under_ddp(model_dir, engine, tmp_path, master_port, ddp):
    zero = train(model_dir, tmp_path / engine, engine, master_port)
    assert "vlm-dpo: step 1: unfroze" in zero.output, zero.output[-3000:]
    if engine == "fsdp2":
        assert zero.results[0]["parameter_type"] == "DTensor"
    else:
        assert "staged group(s)" in zero.output, zero.output[-3000:]
    for rank in (0, 1):
        mine, theirs = zero.results[rank], ddp.results[rank]
        before_stage, at_stage, after = mine["projector_checksums"]
        assert before_stage == at_stage and after != at_stage, mine["projector_checksums"]
        # fp32: the same updates, the gradients summed over the shards in another order (1.5e-7 seen under ZeRO-3).
        assert mine["projector_checksums"] == pytest.approx(theirs["projector_checksums"], rel=1e-6)
        assert mine["losses"] == pytest.approx(theirs["losses"], rel=1e-5, abs=1e-6)
        assert mine["checksum"] == pytest.approx(theirs["checksum"], rel=1e-6)
