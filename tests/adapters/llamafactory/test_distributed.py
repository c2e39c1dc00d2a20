"""``llamafactory-cli train`` on two CPU ranks (``FORCE_TORCHRUN=1 NPROC_PER_NODE=2``, gloo), as users launch it.

- A NaN loss on rank 1 only (its gradients stay finite, so only rank 1's guard can see it): the step is skipped
  on both ranks, the reason names rank 1, the replicas stay equal (rank 0's checkpoints around the step hold
  the same weights and AdamW state) and both ranks' plugin state counts the skip.
- LoRA, LLaMA-Factory's default reentrant gradient checkpointing and ``ddp_find_unused_parameters: true`` (what
  users set for a frozen tower): LLaMA-Factory itself fails on both ranks with DDP's "Expected to mark a variable
  ready only once" (the Qwen2.5-VL report); with the adapter installed it trains, and no DDP wrapper is left for
  interpreter shutdown to tear down after LLaMA-Factory's ``destroy_process_group()`` (the crash at exit that
  ``scripts/two_rank_exit_soak.py`` counts; ``exit_check_plugin.py``).
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")

from exit_check_plugin import expected_lines as no_ddp_wrapper_at_exit  # noqa: E402
from exit_check_plugin import install as install_exit_check  # noqa: E402
from fault_matrix import (  # noqa: E402
    DDP_CRASH,
    assert_one_rank_fault_skipped_on_both,
    assert_skip_logged_once,
    assert_step_changed_nothing,
)
from fault_plugin import install as install_fault_plugin  # noqa: E402
from llamafactory_runs import (  # noqa: E402
    TINY_MODELS,
    assert_projector_trains_from,
    dpo_config,
    run_llamafactory,
    write_dataset,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_dataset(directory, num_rows=8)
    return directory


def two_ranks(tmp_path, model_dir, dataset, env=None, name="cfg", model="llava", **overrides):
    config = dpo_config(TINY_MODELS[model], model_dir, dataset, tmp_path / name, "lora", **overrides)
    return run_llamafactory(tmp_path, config, env=env, nproc=2, name=name)


@pytest.mark.reliability("LLaMA-Factory", row="one-rank-nan")
def test_a_nan_loss_on_one_rank_skips_the_step_on_both(tmp_path, llava, dataset):
    env = install_fault_plugin(tmp_path / "plugins", fault="loss-nan", steps=[1], only_rank=1)
    run = two_ranks(tmp_path, llava, dataset, env=env, max_steps=3, save_strategy="steps", save_steps=1)
    assert run.returncode == 0, run.log()
    assert "world size: 2" in run.output and "[test_fault_injection] loss-nan at step 1" in run.output, run.log()
    assert_one_rank_fault_skipped_on_both(run.output)
    assert_step_changed_nothing(run.output_dir, 1)
    for rank in (0, 1):
        state = json.loads((run.output_dir / "checkpoint-3" / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())
        assert state["guards"]["skipped_steps"] == 1, (rank, state["guards"])


@pytest.mark.reliability("LLaMA-Factory", row="ddp-reentrant")
@pytest.mark.model_support("LLaMA-Factory", "ddp-reentrant", family="llava")
def test_lora_with_reentrant_checkpointing_under_ddp_fails_stock_and_trains_with_the_adapter(tmp_path, llava, dataset):
    assert_stock_fails_and_the_adapter_trains(tmp_path, llava, dataset, "llava")


@pytest.mark.model_support("LLaMA-Factory", "ddp-reentrant", family="qwen2_5_vl")
def test_qwen2_5_vl_lora_with_reentrant_checkpointing_under_ddp(tmp_path, dataset):
    # The setting of the "Expected to mark a variable ready only once" reports, on a Qwen2.5-VL.
    model_dir = TINY_MODELS["qwen2_5_vl"].build(tmp_path / "model")
    assert_stock_fails_and_the_adapter_trains(tmp_path, model_dir, dataset, "qwen2_5_vl")


def assert_stock_fails_and_the_adapter_trains(tmp_path, model_dir, dataset, model):
    settings = dict(max_steps=2, ddp_find_unused_parameters=True, model=model)
    stock = two_ranks(tmp_path, model_dir, dataset, env={"VLM_DPO_LLAMAFACTORY": "0"}, name="stock", **settings)
    assert stock.returncode != 0, stock.log()
    for rank in (0, 1):
        assert f"[rank{rank}]: {DDP_CRASH}" in stock.output, stock.log()

    exit_check = install_exit_check(tmp_path / "plugins")
    run = two_ranks(tmp_path, model_dir, dataset, env=exit_check, name="adapter", **settings)
    assert run.returncode == 0, run.log()
    assert DDP_CRASH not in run.output and "world size: 2" in run.output, run.log()
    assert len(run.losses) == 2 and all(math.isfinite(loss) for loss in run.losses), run.losses
    for line in no_ddp_wrapper_at_exit():
        assert line in run.output, run.log()


def test_an_unfreeze_stage_under_ddp_trains_the_projector_from_its_step(tmp_path, llava, dataset):
    section = {"freeze": {"unfreeze": [{"at_step": 2, "groups": ["projector"]}]}}
    config = dpo_config(
        TINY_MODELS["llava"], llava, dataset, tmp_path / "out", "full",
        max_steps=3, save_strategy="steps", save_steps=1, vlm_dpo=section,
    )  # fmt: skip
    run = run_llamafactory(tmp_path, config, nproc=2)
    assert run.returncode == 0, run.log()
    assert "world size: 2" in run.output and "of later unfreeze stages are trainable from the start" in run.output
    assert "step 2: unfroze" in run.output, run.log()
    assert_projector_trains_from(2, llava, run.output_dir, last_step=3)


def test_four_ranks_on_two_nodes_skip_a_nan_on_the_second_node_everywhere(tmp_path, llava, dataset):
    # Two `llamafactory-cli train` launches on this machine, as two nodes of two ranks (LLaMA-Factory's own
    # NNODES/NODE_RANK/MASTER_ADDR); the NaN loss is on rank 3, the second node's second rank.
    from concurrent.futures import ThreadPoolExecutor

    from framework_cli import free_port

    env = install_fault_plugin(tmp_path / "plugins", fault="loss-nan", steps=[1], only_rank=3)
    env.update(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    config = dpo_config(
        TINY_MODELS["llava"], llava, dataset, tmp_path / "out", "lora", max_steps=3, save_strategy="steps", save_steps=1
    )

    def node(rank: int):
        return run_llamafactory(tmp_path / f"node{rank}", config, env={**env, "NODE_RANK": str(rank)}, nproc=2)

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(node, (0, 1))
    assert first.returncode == 0 and second.returncode == 0, first.log() + second.log()
    assert "world size: 4" in first.output, first.log()
    assert "[test_fault_injection] loss-nan at step 1" in second.output, second.log()
    assert_skip_logged_once(first.output, "rank 3: non-finite loss (nan)")
    assert_step_changed_nothing(first.output_dir, 1)
    for rank in range(4):
        state = json.loads((first.output_dir / "checkpoint-3" / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())
        assert state["guards"]["skipped_steps"] == 1, (rank, state["guards"])
