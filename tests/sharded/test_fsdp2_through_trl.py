"""TRL's own FSDP2 path (accelerate's ``fully_shard`` wrapping, the Trainer's loop, its sharded checkpoints) on two
CPU ranks over gloo, with accelerate's device gate opened (tests/support/fsdp_on_cpu.py; on CPU accelerate
otherwise builds DDP: test_fsdp2.py). Everything after the gate is the stock code a GPU run takes.

The tiny LLaVA, rows read in order one per rank (mixed_batch_worker.py). What it shows:
- stock TRL 1.16 under FSDP2 averages every gradient but the LM head's: its fused head takes the head unit's
  weight outside the unit's forward, and each rank keeps its own slice of its own gradient. The adapter unshards
  the head unit for the call, and FSDP2 averages it like the rest: the run equals DDP's;
- a rank whose batches have no image: stock breaks, the plugins train (the vision lockstep), equal to DDP;
- the freeze policy inside the sharded model, the guards' norm over all shards (DDP's norm), a NaN in one rank's
  shard skipped on both ranks, the plugins' state in each rank's checkpoint and a resume from the sharded
  checkpoint that continues the run exactly;
- LoRA under FSDP2 trains as under DDP;
- the tiny Qwen2-VL (images as flattened patches with their grid, ``pixel_values`` and ``image_grid_thw``; each vision
  block an FSDP2 unit, the merger in the root): a rank without images, a NaN on rank 1, every weight equal to DDP's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from framework_cli import free_port  # noqa: E402
from rank_processes import run_ranks  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from vlm_dpo_plugins.adapters.hf_trainer.checkpoint_state import read_state  # noqa: E402
from vlm_dpo_plugins.tiny import build_tiny_llava, build_tiny_qwen2_vl  # noqa: E402

WORKER = Path(__file__).with_name("mixed_batch_worker.py")
FSDP_ON_CPU = {"VLM_DPO_TEST_FSDP_ON_CPU": "1"}
COLLECTIVE_MISMATCH = "Is there a distributed collective mismatch in your code?"  # gloo's words


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory):
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2-vl"))


def train(model_dir: Path, output_dir: Path, mode: str, engine: str, env: dict, timeout: float = 300):
    environment = {**(FSDP_ON_CPU if engine == "fsdp2" else {}), **env}
    arguments = [str(model_dir), str(output_dir), mode, engine, "language"]
    return run_ranks(WORKER, arguments, free_port(), timeout, env=environment)


def finished(run) -> dict:
    assert set(run.results) == {0, 1}, run.output[-3000:]
    assert run.results[0]["losses"] == run.results[1]["losses"]
    assert run.results[0]["checksum"] == run.results[1]["checksum"]  # whole tensors, gathered from the shards
    return run.results[0]


def test_stock_trl_leaves_the_lm_heads_gradient_unaveraged_and_the_adapter_averages_it(model_dir, tmp_path):
    one_step = {"VLM_DPO_TEST_ALL_IMAGES": "1", "VLM_DPO_TEST_STEPS": "1"}
    stock_fsdp2 = finished(train(model_dir, tmp_path / "stock-fsdp2", "stock", "fsdp2", one_step))
    stock_ddp = finished(train(model_dir, tmp_path / "stock-ddp", "stock", "ddp", one_step))
    assert stock_fsdp2["wrapped_as"] == "FSDPLlavaForConditionalGeneration"
    assert stock_fsdp2["parameter_type"] == "DTensor"
    # The same forward, bit for bit, and every weight but the head's updated alike (AdamW's first step).
    assert stock_fsdp2["chosen_logps"] == stock_ddp["chosen_logps"]
    for part in ("vision", "projector", "language"):
        assert stock_fsdp2["part_checksums"][part] == pytest.approx(stock_ddp["part_checksums"][part], rel=1e-9)
    # The head's gradient is each rank's own: the norm over all shards is not DDP's.
    assert stock_fsdp2["grad_norms"][0] != pytest.approx(stock_ddp["grad_norms"][0], rel=1e-2)

    plugins_fsdp2 = finished(train(model_dir, tmp_path / "fsdp2", "plugins", "fsdp2", one_step))
    plugins_ddp = finished(train(model_dir, tmp_path / "ddp", "plugins", "ddp", one_step))
    assert plugins_fsdp2["grad_norms"] == pytest.approx(plugins_ddp["grad_norms"], rel=1e-6)
    for part in ("head", "language"):
        assert plugins_fsdp2["part_checksums"][part] == pytest.approx(plugins_ddp["part_checksums"][part], rel=1e-9)


def test_a_rank_without_images_breaks_stock_trl_under_fsdp2(model_dir, tmp_path):
    run = train(model_dir, tmp_path, "stock", "fsdp2", {}, timeout=150)
    assert not run.results, "stock TRL finished an FSDP2 run with a text-only rank"
    assert run.timed_out or COLLECTIVE_MISMATCH in run.output, run.output[-3000:]


@pytest.mark.reliability("TRL", row="fsdp2")
def test_fsdp2_through_trl_trains_as_ddp_skips_a_nan_everywhere_and_resumes_from_its_sharded_checkpoint(
    model_dir, tmp_path
):
    # Rank 1's batches never hold an image; at step 1 its shard of a language weight's gradient turns NaN.
    run = {"VLM_DPO_TEST_NAN_RANK": "1", "VLM_DPO_TEST_STEPS": "4", "VLM_DPO_TEST_SAVE_STEPS": "2"}
    fsdp2_run = train(model_dir, tmp_path / "fsdp2", "plugins", "fsdp2", run)
    sharded = finished(fsdp2_run)
    ddp = finished(train(model_dir, tmp_path / "ddp", "plugins", "ddp", run))
    assert sharded["wrapped_as"] == "FSDPLlavaForConditionalGeneration" and sharded["parameter_type"] == "DTensor"
    assert fsdp2_run.results[0]["stand_in_encodes"] == 0 and fsdp2_run.results[1]["stand_in_encodes"] > 0
    assert fsdp2_run.results[0]["skipped"] == fsdp2_run.results[1]["skipped"] == [False, True, False, False]
    # The guards' norm is over all shards: DDP's norm of the averaged gradient (NaN at the skipped step).
    assert sharded["grad_norms"][0] == pytest.approx(ddp["grad_norms"][0], rel=1e-6)
    assert sharded["grad_norms"][2:] == pytest.approx(ddp["grad_norms"][2:], rel=1e-5)
    assert sharded["losses"] == pytest.approx(ddp["losses"], rel=1e-6)
    assert sharded["checksum"] == pytest.approx(ddp["checksum"], rel=1e-7)
    # The default freeze policy inside the sharded model: vision tower and projector exactly as loaded.
    loaded = load_file(model_dir / "model.safetensors")
    # The tiny model is saved in the layout LLaVA checkpoints on the hub have.
    parts = {"vision": "vision_tower.", "projector": "multi_modal_projector.", "language": "language_model.model."}
    for part, prefix in parts.items():
        expected = sum(float(tensor.double().sum()) for name, tensor in loaded.items() if name.startswith(prefix))
        if part == "language":
            assert sharded["part_checksums"][part] != pytest.approx(expected, rel=1e-9), "the language model trained"
        else:
            assert sharded["part_checksums"][part] == pytest.approx(expected, rel=1e-12), part

    checkpoint = tmp_path / "fsdp2" / "checkpoint-2"
    for rank in (0, 1):
        assert read_state(checkpoint, rank)["guards"]["skipped_steps"] == 1
    resumed = finished(
        train(model_dir, tmp_path / "fsdp2", "plugins", "fsdp2", {**run, "VLM_DPO_TEST_RESUME_FROM": str(checkpoint)})
    )
    # The log history before the checkpoint comes back with it; the steps after are the uninterrupted run's.
    assert resumed["losses"] == pytest.approx(sharded["losses"], rel=1e-6)
    assert resumed["checksum"] == pytest.approx(sharded["checksum"], rel=1e-9)


# Qwen2-VL with LoRA is a cell of the FSDP2 matrix the trl session leaves out (the fsdp2_matrix nox session runs it).
@pytest.mark.parametrize("family", ["llava", pytest.param("qwen2_vl", marks=pytest.mark.fsdp2_matrix)])
def test_lora_under_fsdp2_through_trl_trains_as_under_ddp(request, family, tmp_path):
    # LoRA on the language model's q/v projections: the head is frozen, so TRL's own gather of it stays (nothing
    # to average), and the reference pass (the policy's own modules with the adapters off) leaves the policy's
    # unsharded weights alone until its backward. Rank 1's batches without images, a NaN on rank 1 at step 1.
    model_dir = request.getfixturevalue("model_dir" if family == "llava" else "qwen2_vl_dir")
    run = {"VLM_DPO_TEST_LORA": "1", "VLM_DPO_TEST_NAN_RANK": "1", "VLM_DPO_TEST_STEPS": "3"}
    sharded = finished(train(model_dir, tmp_path / "fsdp2", "plugins", "fsdp2", run))
    ddp = finished(train(model_dir, tmp_path / "ddp", "plugins", "ddp", run))
    assert sharded["wrapped_as"] == "FSDPPeftModel" and sharded["skipped"] == [False, True, False]
    assert sharded["losses"] == pytest.approx(ddp["losses"], rel=1e-6)
    taken = (0, 2)  # step 1's norm is NaN in both
    assert [sharded["grad_norms"][i] for i in taken] == pytest.approx([ddp["grad_norms"][i] for i in taken], rel=1e-5)
    assert sharded["checksum"] == pytest.approx(ddp["checksum"], rel=1e-9)


def test_qwen2_vl_under_fsdp2_through_trl_trains_as_ddp_with_a_rank_without_images_and_a_nan_on_rank_1(
    qwen2_vl_dir, tmp_path
):
    # The LLaVA run above, three steps, on a model whose images take another path: flattened patches and their grid
    # (pixel_values, image_grid_thw) into vision blocks (each an FSDP2 unit) and a merger (in the root). Rank 1's
    # batches never hold an image; at step 1 its shard of a language weight's gradient turns NaN. The last step is
    # checkpointed.
    run = {"VLM_DPO_TEST_NAN_RANK": "1", "VLM_DPO_TEST_STEPS": "3", "VLM_DPO_TEST_SAVE_STEPS": "3"}
    fsdp2_run = train(qwen2_vl_dir, tmp_path / "fsdp2", "plugins", "fsdp2", run)
    sharded = finished(fsdp2_run)
    ddp = finished(train(qwen2_vl_dir, tmp_path / "ddp", "plugins", "ddp", run))
    assert sharded["wrapped_as"] == "FSDPQwen2VLForConditionalGeneration" and sharded["parameter_type"] == "DTensor"
    # The vision lockstep: rank 1 encodes the stand-in in each step's policy pass and reference pass (TRL shards the
    # reference model too); rank 0 never does.
    assert fsdp2_run.results[0]["stand_in_encodes"] == 0 and fsdp2_run.results[1]["stand_in_encodes"] == 2 * 3
    assert fsdp2_run.results[0]["skipped"] == fsdp2_run.results[1]["skipped"] == [False, True, False]
    assert sharded["losses"] == pytest.approx(ddp["losses"], rel=1e-6)
    assert sharded["grad_norms"][0] == pytest.approx(ddp["grad_norms"][0], rel=1e-6)  # step 1's is NaN in both
    assert sharded["grad_norms"][2] == pytest.approx(ddp["grad_norms"][2], rel=1e-5)
    assert sharded["checksum"] == pytest.approx(ddp["checksum"], rel=1e-7)

    # Every weight as each run saved it at step 3 (the sharded run gathers the full state dict to save it), against
    # DDP's and the model as loaded. The LM head is among them: stock TRL leaves its gradient unaveraged under FSDP2
    # on this model too (the norm 10% off DDP's after one step), the adapter's unsharded head averages it.
    saved = load_file(tmp_path / "fsdp2" / "checkpoint-3" / "model.safetensors")
    replicated = load_file(tmp_path / "ddp" / "checkpoint-3" / "model.safetensors")
    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(qwen2_vl_dir).state_dict()
    assert saved.keys() == replicated.keys() == loaded.keys()
    for name, weight in saved.items():
        # An AdamW step moves an element by about the learning rate (1e-2): any other update is far outside this.
        torch.testing.assert_close(weight, replicated[name], rtol=1e-6, atol=1e-6, msg=name)
        # The default freeze policy inside the sharded model: the vision blocks and the merger exactly as loaded.
        if name.startswith("model.visual."):
            assert torch.equal(weight, loaded[name]), name
        else:
            assert not torch.equal(weight, loaded[name]), f"{name} did not train"
    for rank in (0, 1):
        assert read_state(tmp_path / "fsdp2" / "checkpoint-3", rank)["guards"]["skipped_steps"] == 1
