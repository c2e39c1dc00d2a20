"""``swift rlhf`` on two CPU ranks (``NPROC_PER_NODE=2 --use_cpu true``, gloo), as users launch it.

- A NaN loss on rank 1 only (its gradients stay finite, so only rank 1's guard can see it): the step is skipped
  on both ranks, the reason names rank 1, the replicas stay equal (rank 0's checkpoints around the step hold
  the same weights and AdamW state) and both ranks' plugin state counts the skip.
- LoRA with reentrant checkpointing (LoRA makes the model a PeftModel, for which transformers turns DDP's
  find_unused_parameters on): swift itself fails on both ranks with DDP's "Expected to mark a variable ready only
  once" (the Qwen2.5-VL report); with the adapter, which keeps the reentrant checkpointing asked for and gives DDP
  a static graph, it trains, and no DDP wrapper is left for interpreter shutdown to tear down in whatever order
  with the process group (the crash at exit that ``scripts/two_rank_exit_soak.py`` counts; ``exit_check_plugin.py``).
"""

from __future__ import annotations

import json
import math

import pytest

swift = pytest.importorskip("swift", reason="needs the ms-swift test environment (ms-swift==4.6.0)")
if getattr(swift, "__file__", None) is None:
    pytest.skip("`swift` is not ms-swift here", allow_module_level=True)

import yaml  # noqa: E402
from exit_check_plugin import expected_lines as no_ddp_wrapper_at_exit  # noqa: E402
from exit_check_plugin import install as install_exit_check  # noqa: E402
from fault_matrix import (  # noqa: E402
    DDP_CRASH,
    assert_one_rank_fault_skipped_on_both,
    assert_skip_logged_once,
    assert_step_changed_nothing,
)
from fault_plugin import install as install_fault_plugin  # noqa: E402
from framework_cli import free_port  # noqa: E402

TWO_CPU_RANKS = ["--tuner_type", "lora", "--use_cpu", "true"]
REENTRANT = ["--gradient_checkpointing_kwargs", '{"use_reentrant": true}']


def two_ranks(swift_dpo, model, extra_args, env=None, output_name="out", max_steps=2):
    env = {"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()), **(env or {})}
    return swift_dpo(
        model,
        num_rows=8,
        max_steps=max_steps,
        extra_args=[*TWO_CPU_RANKS, *extra_args],
        env_extra=env,
        output_name=output_name,
    )


@pytest.mark.reliability("ms-swift", row="one-rank-nan")
def test_a_nan_loss_on_one_rank_skips_the_step_on_both(tmp_path, swift_dpo, qwen2_vl, plugin_file):
    config = tmp_path / "vlm_dpo.yaml"
    config.write_text(yaml.safe_dump({"loss": {"type": "sigmoid"}}))  # the plugins compute the loss: one to poison
    env = {
        "VLM_DPO_CONFIG": str(config),
        **install_fault_plugin(tmp_path / "plugins", fault="loss-nan", steps=[1], only_rank=1),
    }
    extra = ["--save_steps", "1", "--save_only_model", "false", "--external_plugins", plugin_file]
    run = two_ranks(swift_dpo, qwen2_vl, extra, env=env, max_steps=3)
    output = run.stdout + run.stderr
    assert run.returncode == 0, run.tail()
    assert "world_size: 2" in output and "[test_fault_injection] loss-nan at step 1" in output, run.tail()
    assert_one_rank_fault_skipped_on_both(output)
    assert_step_changed_nothing(run.output_dir, 1)
    for rank in (0, 1):
        state = json.loads((run.output_dir / "checkpoint-3" / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())
        assert state["guards"]["skipped_steps"] == 1, (rank, state["guards"])


@pytest.mark.reliability("ms-swift", row="ddp-reentrant")
@pytest.mark.model_support("ms-swift", "ddp-reentrant", family="qwen2_vl")
def test_lora_with_reentrant_checkpointing_under_ddp_fails_stock_and_trains_with_the_adapter(
    tmp_path, swift_dpo, qwen2_vl, plugin_file
):
    assert_stock_fails_and_the_adapter_trains(tmp_path, swift_dpo, qwen2_vl, plugin_file)


@pytest.mark.model_support("ms-swift", "ddp-reentrant", family="qwen2_5_vl")
def test_qwen2_5_vl_lora_with_reentrant_checkpointing_under_ddp(tmp_path, swift_dpo, qwen2_5_vl, plugin_file):
    # The setting of the "Expected to mark a variable ready only once" reports: Qwen2.5-VL, LoRA, reentrant
    # checkpointing, two DDP ranks, through swift rlhf.
    assert_stock_fails_and_the_adapter_trains(tmp_path, swift_dpo, qwen2_5_vl, plugin_file)


def assert_stock_fails_and_the_adapter_trains(tmp_path, swift_dpo, model, plugin_file):
    stock = two_ranks(swift_dpo, model, REENTRANT, output_name="stock")
    assert stock.returncode != 0, stock.tail()
    for rank in (0, 1):
        assert f"[rank{rank}]: {DDP_CRASH}" in stock.stdout + stock.stderr, stock.tail()

    exit_check = install_exit_check(tmp_path / "plugins")
    run = two_ranks(
        swift_dpo, model, [*REENTRANT, "--external_plugins", plugin_file], env=exit_check, output_name="adapter"
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, run.tail()
    assert "world_size: 2" in output and "reentrant checkpointing under DDP: static_graph" in output, run.tail()
    assert DDP_CRASH not in output and "without --use_cpu true" not in output, run.tail()
    losses = [entry["loss"] for entry in run.logged_steps()]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-6) and all(map(math.isfinite, losses))
    state_files = sorted(path.name for path in run.last_checkpoint().glob("vlm_dpo_plugins_state.*"))
    assert state_files == ["vlm_dpo_plugins_state.rank0.json", "vlm_dpo_plugins_state.rank1.json"], state_files
    for line in no_ddp_wrapper_at_exit():
        assert line in output, run.tail()


def test_four_ranks_on_two_nodes_skip_a_nan_on_the_second_node_everywhere(
    tmp_path, swift_dpo, swift_dataset_writer, qwen2_vl, plugin_file
):
    # Two `swift rlhf` launches on this machine, as two nodes of two ranks (swift's own NNODES/NODE_RANK/
    # MASTER_ADDR); the NaN loss is on rank 3, the second node's second rank.
    from concurrent.futures import ThreadPoolExecutor

    config = tmp_path / "vlm_dpo.yaml"
    config.write_text(yaml.safe_dump({"loss": {"type": "sigmoid"}}))
    env = {
        "VLM_DPO_CONFIG": str(config),
        "NPROC_PER_NODE": "2",
        "NNODES": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        **install_fault_plugin(tmp_path / "plugins", fault="loss-nan", steps=[1], only_rank=3),
    }
    model_dir = qwen2_vl.build(tmp_path / "model")
    dataset = swift_dataset_writer(tmp_path / "data" / "train.jsonl", 16)
    extra = [*TWO_CPU_RANKS, "--save_steps", "1", "--save_only_model", "false", "--external_plugins", plugin_file]

    def node(rank: int):
        return swift_dpo(
            qwen2_vl,
            max_steps=3,
            extra_args=extra,
            env_extra={**env, "NODE_RANK": str(rank)},
            dataset=dataset,
            model_dir=model_dir,
            timeout=500,
        )

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(node, (0, 1))
    assert first.returncode == 0 and second.returncode == 0, first.tail() + second.tail()
    output = first.stdout + first.stderr
    assert "world_size: 4" in output, first.tail()
    assert "[test_fault_injection] loss-nan at step 1" in second.stdout + second.stderr, second.tail()
    assert_skip_logged_once(output, "rank 3: non-finite loss (nan)")
    assert_step_changed_nothing(first.output_dir, 1)
    for rank in range(4):
        state = json.loads((first.output_dir / "checkpoint-3" / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())
        assert state["guards"]["skipped_steps"] == 1, (rank, state["guards"])
