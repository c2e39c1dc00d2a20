"""VLMDPOTrainer under real two-process DDP on CPU (gloo), launched by torchrun as users launch it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

from framework_cli import free_port, isolated_env  # noqa: E402

WORKER = Path(__file__).with_name("ddp_worker.py")


def launch_two_ranks(tmp_path, model_dir, checkpointing: str) -> tuple[subprocess.CompletedProcess, Path]:
    output = tmp_path / checkpointing
    output.mkdir()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(WORKER),
        str(model_dir),
        str(output),
        checkpointing,
    ]
    completed = subprocess.run(command, env=isolated_env(tmp_path), capture_output=True, text=True, timeout=600)
    return completed, output


def run_two_ranks(tmp_path, model_dir, checkpointing: str) -> list[dict]:
    completed, output = launch_two_ranks(tmp_path, model_dir, checkpointing)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [json.loads((output / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.reliability("TRL", row="one-rank-nan")
def test_a_nan_on_one_rank_skips_the_step_on_both_and_replicas_stay_identical(tmp_path, tiny_model_dirs):
    ranks = run_two_ranks(tmp_path, tiny_model_dirs["llava"], "none")
    for result in ranks:
        assert result["skipped"] == [False, True, False]
        assert result["replicas_equal"] and result["finite"]
    assert ranks[0]["reasons"][1] == ranks[1]["reasons"][1]
    assert ranks[0]["reasons"][1][0].startswith("rank 1: non-finite gradient norm")


@pytest.mark.reliability("TRL", row="ddp-reentrant")
def test_reentrant_checkpointing_under_ddp_gets_a_static_graph_and_trains(tmp_path, tiny_model_dirs):
    # LoRA, reentrant checkpointing and find_unused_parameters=True together make DDP raise "Expected to mark a
    # variable ready only once" (the Qwen2.5-VL report): stock TRL first, on both ranks. With the plugins the plan
    # keeps reentrant checkpointing, as asked, and makes it safe with a static graph.
    stock, _ = launch_two_ranks(tmp_path, tiny_model_dirs["llava"], "stock-reentrant")
    assert stock.returncode != 0
    for rank in (0, 1):
        failure = f"[rank{rank}]: RuntimeError: Expected to mark a variable ready only once"
        assert failure in stock.stderr, stock.stderr[-4000:]
    ranks = run_two_ranks(tmp_path, tiny_model_dirs["llava"], "reentrant")
    for result in ranks:
        assert result["static_graph"] is True and result["find_unused"] is False
        assert result["replicas_equal"] and result["finite"]


def test_an_unfreeze_stage_under_ddp_trains_the_projector_from_its_step_on_every_rank_alike(tmp_path, tiny_model_dirs):
    # DDP averages only the parameters trainable when it wraps the model: the projector is wrapped trainable and
    # held (its gradients averaged, then dropped) until step 2, then stepped like the rest.
    ranks = run_two_ranks(tmp_path, tiny_model_dirs["llava"], "unfreeze")
    for result in ranks:
        assert result["projector_moved_before_stage"] is False
        assert result["projector_moved_after_stage"] is True
        assert result["projector_in_optimizer"] == 4  # the projector's two linears, weight and bias
        assert result["replicas_equal"] and result["skipped"] == [False] * 4


def test_four_ranks_on_two_nodes_skip_a_nan_on_the_second_node_everywhere(tmp_path, tiny_model_dirs):
    # Two torchrun launches on this machine, as two nodes of two ranks each (static rendezvous at node 0's
    # address): the NaN is on rank 3, node 1's second rank, and every rank on both nodes skips that step.
    output = tmp_path / "out"
    output.mkdir()
    port = free_port()
    environment = {**isolated_env(tmp_path), "VLM_DPO_TEST_NAN_RANK": "3"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes", "2", "--nproc_per_node", "2", "--node_rank", str(node),
                "--master_addr", "127.0.0.1", "--master_port", str(port),
                str(WORKER), str(tiny_model_dirs["llava"]), str(output), "none",
            ],  # fmt: skip
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        logs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode == 0 for node in nodes), "\n".join(log[-3000:] for log in logs)
    ranks = [json.loads((output / f"rank{rank}.json").read_text()) for rank in range(4)]
    for result in ranks:
        assert result["skipped"] == [False, True, False]
        assert result["replicas_equal"] and result["finite"]
        assert result["reasons"][1] == ranks[0]["reasons"][1]
    assert ranks[0]["reasons"][1][0].startswith("rank 3: non-finite gradient norm")
