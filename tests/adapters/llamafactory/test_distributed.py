"""``llamafactory-cli train`` on two CPU ranks (``FORCE_TORCHRUN=1 NPROC_PER_NODE=2``, gloo), as users launch it.

- A NaN loss on rank 1 only (its gradients stay finite, so only rank 1's guard can see it): the step is skipped
  on both ranks, the reason names rank 1, the replicas stay equal (rank 0's checkpoints around the step hold
  the same weights and AdamW state) and both ranks' plugin state counts the skip.
- LoRA, LLaMA-Factory's default reentrant gradient checkpointing and ``ddp_find_unused_parameters: true`` (what
  users set for a frozen tower): LLaMA-Factory itself fails on both ranks with DDP's "Expected to mark a variable
  ready only once" (the Qwen2.5-VL report); with the adapter installed it trains, and no DDP wrapper is left for
  interpreter shutdown to tear down after LLaMA-Factory's ``destroy_process_group()`` (the crash at exit that
  ``scripts/two_rank_exit_soak.py`` counts; ``exit_check_plugin.py``).
- ``freeze.unfreeze`` (full tuning, the projector's stage at step 2): under DDP the projector trains from its step,
  and FSDP2 (the gate opened) and ZeRO-2 (stock) train it from there as DDP does, one DDP run the measure of both.
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
from framework_cli import merged_environments  # noqa: E402
from fsdp_on_cpu import gate_env  # noqa: E402
from llamafactory_runs import (  # noqa: E402
    FSDP2_SETTINGS,
    TINY_MODELS,
    LlamaFactoryRun,
    assert_projector_trains_from,
    dpo_config,
    projector_weights,
    run_llamafactory,
    write_dataset,
)
from saved_models import ADAM_ROUNDING  # noqa: E402

import torch  # noqa: E402


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


def test_four_ranks_on_two_nodes_skip_a_nan_on_the_second_node_everywhere(tmp_path, llava, dataset):
    # Two `llamafactory-cli train` launches on this machine, as two nodes of two ranks (LLaMA-Factory's own
    # NNODES/NODE_RANK/MASTER_ADDR); the NaN loss is on rank 3, the second node's second rank.
    env = install_fault_plugin(tmp_path / "plugins", fault="loss-nan", steps=[1], only_rank=3)
    config = dpo_config(
        TINY_MODELS["llava"], llava, dataset, tmp_path / "out", "lora", max_steps=3, save_strategy="steps", save_steps=1
    )
    first, _ = two_nodes(tmp_path, config, env)
    assert_skip_logged_once(first.output, "rank 3: non-finite loss (nan)")
    assert_step_changed_nothing(first.output_dir, 1)


def test_zero3_on_four_ranks_on_two_nodes_skips_a_nan_gradient_on_the_second_node_everywhere(tmp_path, llava, dataset):
    """LLaMA-Factory's ZeRO-3 (stock: ``use_cpu`` unset, see test_deepspeed_ranks.py), LoRA, four ranks as two nodes:
    a NaN gradient on rank 3 at step 1 reaches every rank in the reduced gradients and DeepSpeed skips the step on
    all four; the adapter saved after the step is the one saved before it, and the next step trains it."""
    pytest.importorskip("deepspeed", reason="needs deepspeed in the LLaMA-Factory environment")
    from fault_matrix import assert_deepspeed_skipped_once, deepspeed_environment, zero_config
    from safetensors.torch import load_file

    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps(zero_config(3)))
    fault = install_fault_plugin(tmp_path / "plugins", fault="grad-nan", steps=[1], only_rank=3)
    config = dpo_config(
        TINY_MODELS["llava"], llava, dataset, tmp_path / "out", "lora",
        max_steps=3, save_strategy="steps", save_steps=1, deepspeed=str(zero3), use_cpu=None,
    )  # fmt: skip
    first, _ = two_nodes(tmp_path, config, {**fault, **deepspeed_environment()}, fault="grad-nan")
    assert "DeepSpeed ZeRO-3 optimizer holds" in first.output, first.log()
    assert_deepspeed_skipped_once(first.output, [entry["vlm_dpo/skipped_steps"] for entry in first.step_logs])
    adapters = [load_file(first.output_dir / f"checkpoint-{step}" / "adapter_model.safetensors") for step in (1, 2, 3)]
    assert adapters[0] and all(adapters[0][name].equal(adapters[1][name]) for name in adapters[0]), "the skip moved it"
    assert any(not adapters[1][name].equal(adapters[2][name]) for name in adapters[1]), "no step after the skip"
    assert all(torch.isfinite(tensor).all() for tensor in adapters[2].values())


def two_nodes(tmp_path, config: dict, env: dict, fault: str = "loss-nan") -> tuple[LlamaFactoryRun, LlamaFactoryRun]:
    """``config`` launched at once as two nodes of two ranks on this machine (LLaMA-Factory's own ``NNODES``/
    ``NODE_RANK``/``MASTER_ADDR``, one ``MASTER_PORT``), ``env`` (a fault plugin's, injecting ``fault`` on rank 3
    at step 1) added; both launches succeed as one world of four, the fault on the second node only, and every
    rank's plugin state in the last checkpoint (checkpoint-3) counts one skipped step."""
    from concurrent.futures import ThreadPoolExecutor

    from framework_cli import free_port

    env = {**env, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}

    def node(rank: int) -> LlamaFactoryRun:
        return run_llamafactory(tmp_path / f"node{rank}", config, env={**env, "NODE_RANK": str(rank)}, nproc=2)

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(node, (0, 1))
    assert first.returncode == 0 and second.returncode == 0, first.log() + second.log()
    assert "world size: 4" in first.output, first.log()
    assert f"[test_fault_injection] {fault} at step 1" in second.output, second.log()
    assert "[test_fault_injection]" not in first.output, first.log()
    for rank in range(4):
        state = json.loads((first.output_dir / "checkpoint-3" / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())
        assert state["guards"]["skipped_steps"] == 1, (rank, state["guards"])
    return first, second


FSDP2 = FSDP2_SETTINGS["llava"]


@pytest.mark.reliability("LLaMA-Factory", row="fsdp2")
def test_fsdp2_trains_as_ddp_skips_a_one_rank_nan_on_both_and_resumes_from_its_sharded_checkpoint(
    tmp_path, llava, dataset
):
    """LLaMA-Factory's own FSDP2 path (``fsdp``/``fsdp_config`` in its YAML, accelerate's ``fully_shard``, the
    Trainer's sharded checkpoints), with accelerate's device gate opened for these CPU ranks (tests/support/
    fsdp_on_cpu.py; docs/scaling.md). Full tuning, a NaN loss on rank 1 at step 1."""
    fault = install_fault_plugin(tmp_path / "plugins", fault="loss-nan", steps=[1], only_rank=1)
    gate = gate_env(tmp_path / "gate")
    sharded_env = merged_environments(gate, fault)

    def two_full_ranks(name: str, env: dict, **overrides) -> LlamaFactoryRun:
        config = dpo_config(
            TINY_MODELS["llava"], llava, dataset, tmp_path / name, "full",
            max_steps=3, save_strategy="steps", save_steps=1, **overrides,
        )  # fmt: skip
        run = run_llamafactory(tmp_path / f"cli-{name}", config, env=env, nproc=2)
        assert run.returncode == 0 and "world size: 2" in run.output, run.log()
        return run

    sharded = two_full_ranks("fsdp2", sharded_env, **FSDP2)
    ddp = two_full_ranks("ddp", fault)
    # accelerate's sharded checkpoint: the model and optimizer as one distributed-checkpoint folder each.
    assert (sharded.output_dir / "checkpoint-1" / "pytorch_model_fsdp_0").is_dir(), "not an FSDP2 checkpoint"
    assert (sharded.output_dir / "checkpoint-1" / "optimizer_0").is_dir()
    assert not (ddp.output_dir / "checkpoint-1" / "pytorch_model_fsdp_0").exists()
    assert_one_rank_fault_skipped_on_both(sharded.output)
    assert sharded.losses[0] == ddp.losses[0] == pytest.approx(math.log(2)), (sharded.losses, ddp.losses)
    # The guards' norm is over all shards; the updates are DDP's (fp32 sums over shards in another order).
    for mine, theirs in zip(sharded.step_logs, ddp.step_logs, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            if not math.isnan(theirs[key]):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (key, mine, theirs)
    for rank in (0, 1):
        state = json.loads((sharded.output_dir / "checkpoint-3" / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())
        assert state["guards"]["skipped_steps"] == 1, (rank, state["guards"])

    # The weights at the end, from the last sharded checkpoint (with accelerate's default SHARDED_STATE_DICT the
    # Trainer's final save writes no model; FSDP_STATE_DICT_TYPE=FULL_STATE_DICT in the environment does: transformers
    # 5.6 reads no state_dict_type from fsdp_config).
    straight = sharded_checkpoint_weights(sharded.output_dir / "checkpoint-3", tmp_path / "straight.pt")
    checkpoint = str(sharded.output_dir / "checkpoint-2")
    resumed = two_full_ranks("fsdp2", sharded_env, **FSDP2, resume_from_checkpoint=checkpoint)
    assert resumed.losses[-1] == pytest.approx(sharded.losses[-1], rel=1e-6), (resumed.losses, sharded.losses)
    after = sharded_checkpoint_weights(resumed.output_dir / "checkpoint-3", tmp_path / "resumed.pt")
    assert after.keys() == straight.keys() and any("language_model" in name for name in after)
    for name, tensor in after.items():
        torch.testing.assert_close(tensor, straight[name], rtol=1e-6, atol=1e-8, msg=name)


QWEN2_VL_FSDP2 = FSDP2_SETTINGS["qwen2_vl"]


def test_fsdp2_with_qwen2_vl_and_lora_trains_as_ddp_and_skips_a_one_rank_nan_on_both(
    tmp_path, tiny_model_dir, dataset
):
    """LLaMA-Factory's own FSDP2 path (the gate opened) with the tiny Qwen2-VL and LoRA (``lora_target: all``, the
    tower and merger frozen by LLaMA-Factory's defaults), a NaN loss on rank 1 at step 1; the measure is the same
    run under DDP.

    What the Trainer saves there: transformers passes ``adapter_only=True`` to accelerate's ``save_fsdp_model``, so a
    checkpoint's ``pytorch_model_fsdp_0`` (a distributed checkpoint, one file per rank) holds the adapter's tensors
    only, under the names of PEFT's ``adapter_model.safetensors``; with accelerate's default ``SHARDED_STATE_DICT``
    neither a checkpoint nor the final output has an ``adapter_model.safetensors`` or ``adapter_config.json``
    (``save_model`` writes a model under FSDP only for ``FULL_STATE_DICT``, which ``FSDP_STATE_DICT_TYPE`` in the
    environment selects: then both are written, not tested here)."""
    model_dir = tiny_model_dir("qwen2_vl")
    fault = install_fault_plugin(tmp_path / "plugins", fault="loss-nan", steps=[1], only_rank=1)
    gate = gate_env(tmp_path / "gate")
    sharded_env = merged_environments(gate, fault)

    def two_lora_ranks(name: str, env: dict, **overrides) -> LlamaFactoryRun:
        config = dpo_config(
            TINY_MODELS["qwen2_vl"], model_dir, dataset, tmp_path / name, "lora",
            max_steps=3, save_strategy="steps", save_steps=3, **overrides,
        )  # fmt: skip
        run = run_llamafactory(tmp_path / f"cli-{name}", config, env=env, nproc=2)
        assert run.returncode == 0 and "world size: 2" in run.output, run.log()
        assert "[test_fault_injection] loss-nan at step 1" in run.output, run.log()
        assert_one_rank_fault_skipped_on_both(run.output)
        for rank in (0, 1):
            state = json.loads((run.output_dir / "checkpoint-3" / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())
            assert state["guards"]["skipped_steps"] == 1, (rank, state["guards"])
        return run

    sharded = two_lora_ranks("fsdp2", sharded_env, **QWEN2_VL_FSDP2)
    ddp = two_lora_ranks("ddp", fault)
    assert sharded.losses[0] == ddp.losses[0] == pytest.approx(math.log(2)), (sharded.losses, ddp.losses)
    assert [entry["vlm_dpo/skipped_steps"] for entry in sharded.step_logs] == [0.0, 1.0, 1.0], sharded.step_logs
    # The guards' norm is over all shards (FSDP2 sums them in another order than DDP: the fsdp2 test's tolerance).
    for mine, theirs in zip(sharded.step_logs, ddp.step_logs, strict=True):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            if not math.isnan(theirs[key]):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (key, mine, theirs)

    checkpoint = sharded.output_dir / "checkpoint-3"
    assert sorted(path.name for path in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp",
    ], "not a two-rank FSDP2 checkpoint"  # fmt: skip
    for folder in (checkpoint, sharded.output_dir):
        assert not {"adapter_model.safetensors", "adapter_config.json"} & {path.name for path in folder.iterdir()}
    assert (ddp.output_dir / "adapter_model.safetensors").is_file()

    # Only the adapters of the language model trained: they are all the checkpoint holds and all AdamW steps (the
    # tower, merger and base weights have no optimizer state), and they equal DDP's after the run.
    from safetensors.torch import load_file

    adapter = sharded_checkpoint_weights(checkpoint, tmp_path / "adapter.pt")
    ddp_adapter = load_file(ddp.output_dir / "checkpoint-3" / "adapter_model.safetensors")
    assert adapter.keys() == ddp_adapter.keys() and adapter, sorted(adapter.keys() ^ ddp_adapter.keys())
    assert all(".lora_" in name and "language_model" in name for name in adapter), sorted(adapter)
    stepped = {name.replace(".default.", ".") for name in sharded_optimizer_state(checkpoint, tmp_path / "adam.pt")}
    assert {name.rsplit(".", 1)[0] for name in stepped} == adapter.keys(), sorted(stepped)
    for name, tensor in adapter.items():
        torch.testing.assert_close(tensor, ddp_adapter[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name), "LoRA B stayed at 0"


def sharded_checkpoint_weights(checkpoint, converted) -> dict:
    """The full tensors of a checkpoint's FSDP2 model folder (a torch distributed checkpoint)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", converted)
    return torch.load(converted, weights_only=True)["model"]


def test_an_unfreeze_stage_trains_the_projector_from_its_step_under_ddp_fsdp2_and_zero_alike(tmp_path, llava, dataset):
    """``freeze.unfreeze`` on two ranks (LLaVA, full tuning, the projector's stage at step 2, a checkpoint each step)
    under DDP, LLaMA-Factory's own FSDP2 path (the gate opened, as the fsdp2 test above) and its ZeRO-2 and ZeRO-3
    paths (stock: ``use_cpu`` unset, see test_deepspeed_ranks.py). One DDP run is the measure of every sharded run.

    - DDP: the projector is held trainable from the start, its gradient dropped until its stage, then it joins the
      optimizer; the saved projector is the model's until checkpoint 2 and trains at step 2.
    - FSDP2: likewise, each rank's shard of the projector alike; every weight after the stage, the losses and each
      group's gradient norm (over all shards) are DDP's.
    - ZeRO-2 and ZeRO-3: the projector is in ZeRO's partitioned optimizer from the start, inert until its stage
      (docs/scaling.md), then trains; every checkpoint's weights, the losses and gradient norms are DDP's.
    """
    pytest.importorskip("deepspeed", reason="needs deepspeed in the LLaMA-Factory environment")
    from fault_matrix import deepspeed_environment, zero_config
    from safetensors.torch import load_file

    section = {"freeze": {"unfreeze": [{"at_step": 2, "groups": ["projector"]}]}}

    def two_full_ranks(name: str, env: dict | None, **overrides) -> LlamaFactoryRun:
        config = dpo_config(
            TINY_MODELS["llava"], llava, dataset, tmp_path / name, "full",
            max_steps=3, save_strategy="steps", save_steps=1, vlm_dpo=section, **overrides,
        )  # fmt: skip
        run = run_llamafactory(tmp_path / f"cli-{name}", config, env=env, nproc=2)
        assert run.returncode == 0 and "world size: 2" in run.output, run.log()
        assert run.output.count("step 2: unfroze") == 2, run.log()  # on each rank
        return run

    # The measure both sharded engines must equal.
    ddp = two_full_ranks("ddp", None)
    assert "of later unfreeze stages are trainable from the start" in ddp.output, ddp.log()
    assert_projector_trains_from(2, llava, ddp.output_dir, last_step=3)
    ddp_saved = {step: load_file(ddp.output_dir / f"checkpoint-{step}/model.safetensors") for step in (1, 2, 3)}

    # FSDP2.
    sharded = two_full_ranks("fsdp2", gate_env(tmp_path / "gate"), **FSDP2)
    assert "of later unfreeze stages are trainable from the start" in sharded.output, sharded.log()
    assert (sharded.output_dir / "checkpoint-1" / "pytorch_model_fsdp_0").is_dir(), "not an FSDP2 checkpoint"
    initial = projector_weights(llava / "model.safetensors")
    saved = {
        step: sharded_checkpoint_weights(sharded.output_dir / f"checkpoint-{step}", tmp_path / f"{step}.pt")
        for step in (1, 2, 3)
    }
    projector = {step: projector_of(weights) for step, weights in saved.items()}
    assert initial and all(projector[step].keys() == initial.keys() for step in saved), projector[3].keys()
    # fully_shard splits each weight on dim 0 over the ranks: rank r's shard is chunk r. Each rank's shard must be
    # held before the stage and stepped from it, not only the weights as a whole.
    for name, tensor in initial.items():
        for rank, start in enumerate(tensor.chunk(2)):
            shard = {step: projector[step][name].chunk(2)[rank] for step in saved}
            assert shard[1].equal(start) and shard[2].equal(start), f"rank {rank}'s shard of {name} moved before step 2"
            assert not shard[3].equal(start), f"rank {rank}'s shard of {name} did not train at step 2"
    # Every weight after the stage, the losses and each group's gradient norm (over all shards) are DDP's; the
    # projector's norm appears at its stage, its held gradient never counted before.
    assert saved[3].keys() == ddp_saved[3].keys()
    for name, tensor in saved[3].items():
        torch.testing.assert_close(tensor, ddp_saved[3][name], rtol=1e-5, atol=1e-7, msg=f"fsdp2: {name}")
    assert [("vlm_dpo/grad_norm/projector" in entry) for entry in sharded.step_logs] == [False, False, True]
    for mine, theirs in zip(sharded.step_logs, ddp.step_logs, strict=True):
        assert mine.keys() == theirs.keys()
        for key in [key for key in theirs if key in ("loss", "rewards/margins") or "grad_norm" in key]:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), ("fsdp2", key, mine, theirs)

    # ZeRO-2 and ZeRO-3, stock (use_cpu unset), DeepSpeed's environment as the DeepSpeed tests set it. ZeRO-3 gathers
    # the whole model into each checkpoint's model.safetensors (stage3_gather_16bit_weights_on_model_save: the
    # model's own dtype, fp32 here), as the other engines write it.
    for stage in (2, 3):
        deepspeed_config = tmp_path / f"zero{stage}.json"
        settings = zero_config(stage)
        if stage == 3:
            settings["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        deepspeed_config.write_text(json.dumps(settings))
        zero = two_full_ranks(f"zero{stage}", deepspeed_environment(), deepspeed=str(deepspeed_config), use_cpu=None)
        logged = f"DeepSpeed ZeRO-{stage} optimizer holds"
        assert logged in zero.output and "staged group(s)" in zero.output, zero.log()
        assert_projector_trains_from(2, llava, zero.output_dir, last_step=3)
        # ZeRO-3 reduce-scatters the gradients, summing them in another order than DDP's all-reduce (seen: 3e-7).
        within = dict(rtol=1e-5, atol=1e-7 if stage == 2 else ADAM_ROUNDING)
        for step in (1, 2, 3):
            mine, theirs = load_file(zero.output_dir / f"checkpoint-{step}/model.safetensors"), ddp_saved[step]
            assert mine.keys() == theirs.keys()
            for name, tensor in mine.items():
                message = f"zero{stage} checkpoint-{step}: {name}"
                torch.testing.assert_close(tensor, theirs[name], **within, msg=message)
        for mine, theirs in zip(zero.step_logs, ddp.step_logs, strict=True):
            for key in ("loss", "grad_norm"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (stage, key, mine, theirs)


def projector_of(weights: dict) -> dict:
    """The projector's tensors of a full state dict, by their name inside the projector (as ``projector_weights``)."""
    return {name[name.index("multi_modal_projector") :]: weights[name] for name in weights if "projector" in name}


def test_four_fsdp2_ranks_on_two_nodes_skip_a_nan_on_the_second_node_everywhere(tmp_path, llava, dataset):
    """Four FSDP2 ranks through LLaMA-Factory's own path (the gate opened, full tuning, the fsdp2 test's settings),
    launched as two nodes of two ranks (``NNODES``/``NODE_RANK``): a NaN loss on rank 3, the second node's second
    rank, skips the step on all four, every rank's shard of the weights and of AdamW's state unchanged by it."""
    fault = install_fault_plugin(tmp_path / "plugins", fault="loss-nan", steps=[1], only_rank=3)
    gate = gate_env(tmp_path / "gate")
    env = merged_environments(gate, fault)
    config = dpo_config(
        TINY_MODELS["llava"], llava, dataset, tmp_path / "out", "full",
        max_steps=3, save_strategy="steps", save_steps=1, **FSDP2,
    )  # fmt: skip
    first, _ = two_nodes(tmp_path, config, env)
    assert_skip_logged_once(first.output, "step 1:", "rank 3: non-finite loss (nan)")
    checkpoints = [first.output_dir / f"checkpoint-{step}" for step in (1, 2, 3)]
    assert all((folder / "pytorch_model_fsdp_0").is_dir() for folder in checkpoints), "not FSDP2 checkpoints"

    # Checkpoint 1 is before the skipped step, checkpoint 2 after it, checkpoint 3 after the next step.
    weights = [sharded_checkpoint_weights(folder, tmp_path / f"model-{folder.name}.pt") for folder in checkpoints]
    moments = [sharded_optimizer_state(folder, tmp_path / f"optimizer-{folder.name}.pt") for folder in checkpoints]
    assert weights[0].keys() == weights[1].keys() and moments[0] and moments[0].keys() == moments[1].keys()
    for name in weights[0]:
        assert weights[0][name].equal(weights[1][name]), f"the skipped step changed {name}"
    for name in moments[0]:
        assert moments[0][name].equal(moments[1][name]), f"the skipped step moved the optimizer's {name}"
    schedules = [torch.load(folder / "scheduler.pt", weights_only=False)["last_epoch"] for folder in checkpoints]
    assert schedules == [1, 1, 2], schedules
    adam_steps = [{value.item() for key, value in state.items() if key.endswith(".step")} for state in moments]
    assert adam_steps == [{1.0}, {1.0}, {2.0}], adam_steps
    assert [entry["vlm_dpo/skipped_steps"] for entry in first.step_logs] == [0.0, 1.0, 1.0], first.step_logs
    # fully_shard gives rank r chunk r of each weight on dim 0: every rank's shard trained on after the skip.
    trained = [name for name in weights[1] if not weights[1][name].equal(weights[2][name])]
    assert trained and all(torch.isfinite(tensor).all() for tensor in weights[2].values()), trained
    for rank in range(4):
        assert any(
            not weights[1][name].chunk(4)[rank].equal(weights[2][name].chunk(4)[rank])
            for name in trained if weights[1][name].shape[0] >= 4
        ), f"rank {rank}'s shards did not train after the skipped step"  # fmt: skip


def sharded_optimizer_state(checkpoint, converted) -> dict:
    """AdamW's full state tensors in a checkpoint's FSDP2 optimizer folder, flattened to ``"<param>.<key>"``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "optimizer_0", converted)
    state = torch.load(converted, weights_only=True)["optimizer"]["state"]
    return {f"{name}.{key}": value for name, entry in state.items() for key, value in entry.items()}
