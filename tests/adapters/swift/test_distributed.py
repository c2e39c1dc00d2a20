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
import os

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
from fsdp_on_cpu import gate_env  # noqa: E402

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


@pytest.mark.reliability("ms-swift", row="fsdp2")
def test_fsdp2_trains_as_ddp_skips_a_one_rank_nan_on_both_and_resumes_from_its_sharded_checkpoint(
    tmp_path, swift_dpo, qwen2_vl, plugin_file
):
    """swift's own FSDP2 path (``--fsdp fsdp2``: its fsdp2.json, accelerate's ``fully_shard``, sharded
    checkpoints), with accelerate's device gate opened for these CPU ranks (tests/support/fsdp_on_cpu.py;
    docs/scaling.md). Full tuning of the tiny Qwen2-VL, a NaN loss on rank 1 at step 1."""
    config = tmp_path / "vlm_dpo.yaml"
    config.write_text(yaml.safe_dump({"loss": {"type": "sigmoid"}}))  # the plugins compute the loss: one to poison
    fault = install_fault_plugin(tmp_path / "plugins", fault="loss-nan", steps=[1], only_rank=1)
    fault["VLM_DPO_CONFIG"] = str(config)
    gate = gate_env(tmp_path / "gate")
    sharded_env = {**fault, "PYTHONPATH": os.pathsep.join([gate["PYTHONPATH"], fault["PYTHONPATH"]])}
    common = ["--tuner_type", "full", "--use_cpu", "true", "--save_steps", "1", "--save_only_model", "false",
              "--external_plugins", plugin_file]  # fmt: skip

    def two_full_ranks(name, env, extra):
        env = {"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()), **env}
        run = swift_dpo(
            qwen2_vl, num_rows=8, max_steps=3, extra_args=[*common, *extra], env_extra=env, output_name=name,
            model_dir=model_dir,
        )  # fmt: skip
        assert run.returncode == 0 and "world_size: 2" in run.stdout + run.stderr, run.tail()
        return run

    model_dir = qwen2_vl.build(tmp_path / "model")
    sharded = two_full_ranks("fsdp2", sharded_env, ["--fsdp", "fsdp2"])
    ddp = two_full_ranks("ddp", fault, [])
    checkpoint = sharded.output_dir / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir(), sorted(path.name for path in checkpoint.iterdir())
    assert_one_rank_fault_skipped_on_both(sharded.stdout + sharded.stderr)
    for mine, theirs in zip(sharded.logged_steps(), ddp.logged_steps(), strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            if not math.isnan(theirs[key]):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (key, mine, theirs)
    for rank in (0, 1):
        state = json.loads((checkpoint / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())
        assert state["guards"]["skipped_steps"] == 1, (rank, state["guards"])
