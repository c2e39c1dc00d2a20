"""Four ranks, standing for two nodes of two, through TRL's own FSDP2 path (``DPOTrainer.train()`` via
``VLMDPOTrainer``, accelerate's ``fully_shard`` wrapping, with its CPU gate opened: tests/support/fsdp_on_cpu.py),
against the same four ranks under DDP.

Two ranks (test_fsdp2_through_trl.py) leave every parameter in two shards and one peer to agree with; four ranks
split each parameter four ways and put the NaN where a multi-node run would: on rank 3, the second rank of the
"second node" (LOCAL_RANK 1, GROUP_RANK 1), whose shard of the reduced gradient is the only one holding it. The
guards have to see that NaN through the norm over all shards and skip the step on all four ranks, or the ranks'
weights part. Rows read in order one per rank: the odd ranks (one on each
"node") only ever get text-only pairs, so the vision lockstep runs across nodes too.

What it shows: the same skipped step on every rank, the ranks' losses and whole weights (gathered from the shards)
identical, the run equal to DDP's (losses, gradient norms over all shards, every part's weights) and the frozen
vision tower and projector exactly as loaded.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

pytest.importorskip("trl")

from framework_cli import free_port  # noqa: E402
from rank_processes import run_ranks  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from vlm_dpo_plugins.tiny import build_tiny_llava  # noqa: E402

WORKER = Path(__file__).with_name("mixed_batch_worker.py")
WORLD_SIZE, RANKS_PER_NODE = 4, 2
NAN_RANK = 3  # the "second node"'s second rank
STEPS = 3  # a step before the NaN (its norm is clean), the NaN step, one after it (training went on alike)


def train(model_dir: Path, output_dir: Path, engine: str) -> dict[int, dict]:
    environment = {"VLM_DPO_TEST_NAN_RANK": str(NAN_RANK), "VLM_DPO_TEST_STEPS": str(STEPS)}
    if engine == "fsdp2":
        environment["VLM_DPO_TEST_FSDP_ON_CPU"] = "1"  # without the gate accelerate builds DDP on CPU
    arguments = [str(model_dir), str(output_dir), "plugins", engine, "language"]
    # Four single-threaded ranks on a two-core machine: a generous limit, since a hang is also an outcome here.
    run = run_ranks(
        WORKER, arguments, free_port(), 400, world_size=WORLD_SIZE, env=environment, ranks_per_node=RANKS_PER_NODE
    )
    assert set(run.results) == set(range(WORLD_SIZE)), run.output[-4000:]
    return run.results


def agreed(results: dict[int, dict]) -> dict:
    """The one result all four ranks hold: a rank that skipped alone, or stepped on a NaN, would differ here."""
    first = results[0]
    for rank, result in results.items():
        assert result["skipped"] == [False, True, False], (rank, result["skipped"])
        # Compared as text: NaN (the skipped step's norm) is not equal to itself.
        assert repr(result["losses"]) == repr(first["losses"]), rank
        assert repr(result["grad_norms"]) == repr(first["grad_norms"]), rank
        assert result["checksum"] == first["checksum"], rank  # whole tensors, gathered from the shards
        assert result["part_checksums"] == first["part_checksums"], rank
    return first


def test_four_fsdp2_ranks_on_two_nodes_skip_a_nan_on_the_second_node_everywhere_and_train_as_ddp(tmp_path):
    model_dir = build_tiny_llava(tmp_path / "llava")
    fsdp2_results = train(model_dir, tmp_path / "fsdp2", "fsdp2")
    sharded = agreed(fsdp2_results)
    ddp = agreed(train(model_dir, tmp_path / "ddp", "ddp"))

    assert sharded["wrapped_as"] == "FSDPLlavaForConditionalGeneration" and sharded["parameter_type"] == "DTensor"
    # The text-only ranks, one per "node", encode the stand-in image; the others never do.
    for rank, result in fsdp2_results.items():
        assert (result["stand_in_encodes"] > 0) == bool(rank % 2), (rank, result["stand_in_encodes"])

    # The guards' norm is over all four shards: DDP's norm of the averaged gradient, NaN at the skipped step.
    assert math.isnan(sharded["grad_norms"][1]) and math.isnan(ddp["grad_norms"][1])
    assert sharded["grad_norms"][0] == pytest.approx(ddp["grad_norms"][0], rel=1e-6)
    assert sharded["grad_norms"][2:] == pytest.approx(ddp["grad_norms"][2:], rel=1e-5)
    assert sharded["losses"] == pytest.approx(ddp["losses"], rel=1e-6)
    assert sharded["checksum"] == pytest.approx(ddp["checksum"], rel=1e-7)
    assert sharded["part_checksums"]["language"] == pytest.approx(ddp["part_checksums"]["language"], rel=1e-7)
    # Two ranks' averages round alike under both engines (a + b == b + a), four ranks' do not: FSDP2's
    # reduce-scatter and DDP's all-reduce add the four gradients in another order. The head's small sum moves the
    # most (about 1e-7 of it after one step); a head gradient left unaveraged, stock TRL's, moves it by half.
    assert sharded["part_checksums"]["head"] == pytest.approx(ddp["part_checksums"]["head"], rel=1e-6)

    # The default freeze policy inside the four-way sharded model: vision tower and projector exactly as loaded
    # (the tiny model is saved in the layout of LLaVA checkpoints on the hub).
    loaded = load_file(model_dir / "model.safetensors")
    parts = {"vision": "vision_tower.", "projector": "multi_modal_projector.", "language": "language_model.model."}
    for (engine, result), (part, prefix) in itertools.product({"fsdp2": sharded, "ddp": ddp}.items(), parts.items()):
        expected = sum(float(tensor.double().sum()) for name, tensor in loaded.items() if name.startswith(prefix))
        if part == "language":
            assert result["part_checksums"][part] != pytest.approx(expected, rel=1e-9), f"{engine}: language trained"
        else:
            assert result["part_checksums"][part] == pytest.approx(expected, rel=1e-12), (engine, part)
