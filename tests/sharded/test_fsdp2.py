"""FSDP2 on two CPU ranks: the vision lockstep with a rank whose batch has no image, and the guards on sharded
gradients.

Without the lockstep the ranks' collectives stop matching; with it both ranks finish with their own losses and
exactly the gradients an unsharded model averages. The guards' norm is over all shards (a rank's own shard gives
another number), clipping brings the whole gradient to ``max_grad_norm``, and a NaN in one rank's shard skips the
step on every rank (two, and four as two nodes of two) with the shards of the weights and of AdamW's state
untouched.

accelerate builds FSDP only on accelerators (with ``use_cpu`` it silently builds DDP, below); the frameworks' own
FSDP2 paths run with that gate opened (test_fsdp2_through_trl.py, and the LLaMA-Factory and ms-swift suites).
Here, below any framework, where gradients can be compared directly: torch's ``fully_shard`` over gloo on the
tiny LLaVA, each vision layer, language layer and the projector a unit as accelerate's transformer auto-wrap
makes them, the lockstep installed as the shared step installs it (``VisionLockstep([model])``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rank_processes import run_ranks as run_processes

from vlm_dpo_plugins.tiny import build_tiny_llava

WORKER = Path(__file__).with_name("fsdp2_worker.py")
TRL_WORKER = Path(__file__).with_name("mixed_batch_worker.py")
STEPS = 2
MAX_NORM = 0.5  # as fsdp2_worker.py clips
COLLECTIVE_MISMATCH = "Is there a distributed collective mismatch in your code?"  # gloo's words


def test_on_cpu_accelerate_builds_ddp_where_trl_is_asked_for_fsdp2(model_dir, tmp_path, master_port):
    """Why the framework-level FSDP2 tests open accelerate's gate (tests/support/fsdp_on_cpu.py): TRL,
    LLaMA-Factory and ms-swift all hand FSDP to accelerate, which switches to FSDP only on an accelerator and
    otherwise wraps the model in DDP, silently."""
    pytest.importorskip("trl")
    arguments = [str(model_dir), str(tmp_path), "stock", "fsdp2", "language"]
    run = run_processes(TRL_WORKER, arguments, master_port, timeout=180)
    assert set(run.results) == {0, 1}, run.output[-3000:]
    assert run.results[0]["wrapped_as"] == "DistributedDataParallel"
    assert run.results[0]["fsdp_enabled"] is False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


def test_without_the_lockstep_a_text_only_rank_breaks_fsdp2(model_dir, master_port):
    run = run_processes(WORKER, [str(model_dir), "stock", "language"], master_port, timeout=120)
    assert not run.results, "FSDP2 finished with a text-only rank and no lockstep"
    assert run.timed_out or COLLECTIVE_MISMATCH in run.output, run.output[-3000:]


@pytest.mark.parametrize("trainable", ["language", "language,projector"])
def test_with_the_lockstep_fsdp2_gives_the_unsharded_losses_and_gradients(model_dir, master_port, trainable):
    run = run_processes(WORKER, [str(model_dir), "lockstep", trainable], master_port, timeout=180)
    assert set(run.results) == {0, 1}, run.output[-3000:]
    for rank, result in run.results.items():
        assert result["losses"] == pytest.approx(result["expected_losses"], rel=1e-6), rank
        # fp32: the same sums, reduced over the ranks in another order.
        assert result["worst_grad_difference"] < 1e-6, (rank, result)
        assert result["compared_grads"] > 0
    assert run.results[0]["stand_in_encodes"] == 0
    assert run.results[1]["stand_in_encodes"] == STEPS  # rank 1 never has an image


# Four ranks stand for two nodes of two: the NaN is in the last rank's shard, on the "second node".
@pytest.mark.parametrize("world_size", [2, 4])
def test_the_guards_clip_over_all_shards_and_skip_a_nan_in_one_rank_s_shard_everywhere(
    model_dir, master_port, world_size
):
    arguments = [str(model_dir), "guards", "language"]
    run = run_processes(WORKER, arguments, master_port, timeout=300, world_size=world_size)
    assert set(run.results) == set(range(world_size)), run.output[-3000:]
    for rank, result in run.results.items():
        assert result["first_norm"] == pytest.approx(result["expected_first_norm"], rel=1e-6), rank
        assert result["first_norm"] > MAX_NORM and not result["first_skipped"]
        assert result["clipped_norm"] == pytest.approx(MAX_NORM, rel=1e-5)
        assert result["second_skipped"], rank
        assert result["weights_unchanged"] and result["optimizer_state_unchanged"], (rank, result)
        # One vote: the other ranks' own shards were finite, yet they skipped too, naming what the last rank saw.
        assert result["second_reasons"] == run.results[0]["second_reasons"]
    named = f"rank {world_size - 1}: non-finite gradient norm"
    assert any(reason.startswith(named) for reason in run.results[0]["second_reasons"])


def test_an_unfreeze_stage_under_fsdp2_trains_the_projector_from_its_step_as_one_process_does(model_dir, master_port):
    """The shared step holds a later stage's parameters under FSDP2 as under DDP: trainable from the start, their
    gradient dropped until the stage, then into the optimizer. The sharded weights equal one process stepping the
    ranks' averaged gradients, AdamW with weight decay, the projector untouched before its stage."""
    run = run_processes(WORKER, [str(model_dir), "unfreeze", "language"], master_port, timeout=240)
    assert set(run.results) == {0, 1}, run.output[-3000:]
    for rank, result in run.results.items():
        assert result["projector_moved"] == [False, True, True], (rank, result)
        assert result["worst_weight_difference"] < 1e-6, (rank, result)


def test_torch_s_fully_shard_also_takes_a_stage_set_after_wrapping(model_dir, master_port):
    """What the held route does not rely on, shown for the record: torch 2.13's ``fully_shard`` reads
    ``requires_grad`` again when it gathers, so the projector made trainable only at its stage (as on one process)
    trains the same. The shared step holds anyway, so what FSDP2 wrapped never changes, the route DDP needs."""
    run = run_processes(WORKER, [str(model_dir), "unfreeze-unheld", "language"], master_port, timeout=240)
    assert set(run.results) == {0, 1}, run.output[-3000:]
    for rank, result in run.results.items():
        assert result["projector_moved"] == [False, True, True], (rank, result)
        assert result["worst_weight_difference"] < 1e-6, (rank, result)
