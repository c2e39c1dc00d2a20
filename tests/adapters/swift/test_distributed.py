"""``swift rlhf`` on two CPU ranks (``NPROC_PER_NODE=2 --use_cpu true``, gloo), as users launch it.

- A NaN loss on rank 1 only (its gradients stay finite, so only rank 1's guard can see it): the step is skipped
  on both ranks, the reason names rank 1, the replicas stay equal (rank 0's checkpoints around the step hold
  the same weights and AdamW state) and both ranks' plugin state counts the skip.
- LoRA with reentrant checkpointing (LoRA makes the model a PeftModel, for which transformers turns DDP's
  find_unused_parameters on): swift itself fails on both ranks with DDP's "Expected to mark a variable ready only
  once" (the Qwen2.5-VL report); with the adapter, which keeps the reentrant checkpointing asked for and gives DDP
  a static graph, it trains, and no DDP wrapper is left for interpreter shutdown to tear down in whatever order
  with the process group (the crash at exit that ``scripts/two_rank_exit_soak.py`` counts; ``exit_check_plugin.py``).
- swift's own FSDP2 path (``--fsdp fsdp2``, accelerate's CPU gate opened; full tuning): equal to DDP, a one-rank
  NaN skipped on both, resumed from the sharded checkpoint exactly (weights, AdamW state, guard state); four ranks
  as two nodes, a NaN on rank 3 skipped by every rank's shard. With LoRA on the tiny LLaVA: equal to DDP, the
  one-rank NaN skipped on both; the checkpoints hold the adapter alone, as a distributed checkpoint (no
  ``adapter_model.safetensors``), and the base, vision tower and projector stay as loaded.
- An unfreeze stage under DDP, FSDP2 and a stock ZeRO-2 (``--deepspeed``), one test: held (or inert in ZeRO's
  optimizer) until its step, then trained, every checkpoint's weights equal to DDP's.
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
    SKIP_LINE,
    assert_deepspeed_skipped_once,
    assert_one_rank_fault_skipped_on_both,
    assert_skip_logged_once,
    assert_step_changed_nothing,
    deepspeed_environment,
    zero_config,
)
from fault_plugin import install as install_fault_plugin  # noqa: E402
from framework_cli import free_port, merged_environments  # noqa: E402
from fsdp_on_cpu import gate_env  # noqa: E402
from full_weights_plugin import install as install_full_weights  # noqa: E402

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


def two_nodes_with_a_nan_on_rank_3(
    tmp_path, swift_dpo, swift_dataset_writer, model, plugin_file, extra, gate=None, fault="loss-nan", env=None
):
    """Two ``swift rlhf`` launches on this machine as two nodes of two ranks (swift's own NNODES/NODE_RANK/
    MASTER_ADDR), three steps of ``model`` with ``extra`` and the plugins, a NaN (``fault``: in the loss, or in a
    gradient under DeepSpeed) on rank 3 (the second node's second rank) at step 1; ``gate(env, folder)`` opens what
    these CPU ranks need (``with_gate``: accelerate's FSDP gate). Asserts what every such run shows: both nodes
    succeed as one world of four, the fault fired on the second node, the step was skipped once (for rank 3's reason
    alone; under DeepSpeed by DeepSpeed, counted once), and all four ranks' plugin state counts the skip. Returns the
    first node's run (rank 0 saves)."""
    from concurrent.futures import ThreadPoolExecutor

    config = tmp_path / "vlm_dpo.yaml"
    config.write_text(yaml.safe_dump({"loss": {"type": "sigmoid"}}))  # the plugins compute the loss: one to poison
    env = {**(env or {}), **install_fault_plugin(tmp_path / "plugins", fault=fault, steps=[1], only_rank=3)}
    env["VLM_DPO_CONFIG"] = str(config)
    if gate:
        env = gate(env, tmp_path / "gate")
    env.update(NPROC_PER_NODE="2", NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    model_dir = model.build(tmp_path / "model")
    dataset = swift_dataset_writer(tmp_path / "data" / "train.jsonl", 16)

    def node(rank: int):
        return swift_dpo(
            model, max_steps=3, extra_args=[*extra, "--external_plugins", plugin_file],
            env_extra={**env, "NODE_RANK": str(rank)}, dataset=dataset, model_dir=model_dir, timeout=500,
        )  # fmt: skip

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(node, (0, 1))
    assert first.returncode == 0 and second.returncode == 0, first.tail() + second.tail()
    output = first.stdout + first.stderr
    assert "world_size: 4" in output, first.tail()
    assert f"[test_fault_injection] {fault} at step 1" in second.stdout + second.stderr, second.tail()
    if "--deepspeed" in extra:
        # The NaN reaches every rank in the reduced gradients: DeepSpeed skips the step, the guards count it.
        assert_deepspeed_skipped_once(output, [entry["vlm_dpo/skipped_steps"] for entry in first.logged_steps()])
    else:
        assert_skip_logged_once(output, "rank 3: non-finite loss (nan)")
        assert "rank 0:" not in next(line for line in output.splitlines() if SKIP_LINE in line)
    for rank in range(4):
        state = json.loads((first.output_dir / "checkpoint-3" / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())
        assert state["guards"]["skipped_steps"] == 1, (rank, state["guards"])
    return first


def test_four_ranks_on_two_nodes_skip_a_nan_on_the_second_node_everywhere(
    tmp_path, swift_dpo, swift_dataset_writer, qwen2_vl, plugin_file
):
    # LoRA under DDP: rank 0's checkpoints around the skipped step hold the same weights and AdamW state.
    extra = [*TWO_CPU_RANKS, "--save_steps", "1", "--save_only_model", "false"]
    first = two_nodes_with_a_nan_on_rank_3(tmp_path, swift_dpo, swift_dataset_writer, qwen2_vl, plugin_file, extra)
    assert_step_changed_nothing(first.output_dir, 1)


def test_zero3_on_four_ranks_on_two_nodes_skips_a_nan_gradient_on_the_second_node_everywhere(
    tmp_path, swift_dpo, swift_dataset_writer, qwen2_vl, plugin_file
):
    """ZeRO-3 (``--deepspeed``, ``--use_cpu true`` with DeepSpeed's communication opened on the gloo group:
    tests/support/deepspeed_on_cpu.py), LoRA, four ranks as two nodes: a NaN gradient on rank 3 at step 1 is
    skipped by DeepSpeed on all four; the adapter saved after the step is the one saved before it, and the next
    step trains it."""
    pytest.importorskip("deepspeed")
    import torch
    from deepspeed_on_cpu import gate_env as deepspeed_gate_env
    from safetensors.torch import load_file

    def deepspeed_gate(env, folder):
        return merged_environments(deepspeed_gate_env(folder), env)

    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps(zero_config(3)))
    extra = [*TWO_CPU_RANKS, "--fp16", "false", "--bf16", "false", "--save_steps", "1", "--deepspeed", str(zero3)]
    first = two_nodes_with_a_nan_on_rank_3(
        tmp_path, swift_dpo, swift_dataset_writer, qwen2_vl, plugin_file, extra,
        gate=deepspeed_gate, fault="grad-nan", env=deepspeed_environment(),
    )  # fmt: skip
    assert "DeepSpeed ZeRO-3 optimizer holds" in first.stdout + first.stderr, first.tail()
    adapters = [load_file(first.output_dir / f"checkpoint-{step}" / "adapter_model.safetensors") for step in (1, 2, 3)]
    assert adapters[0] and all(adapters[0][name].equal(adapters[1][name]) for name in adapters[0]), "the skip moved it"
    assert any(not adapters[1][name].equal(adapters[2][name]) for name in adapters[1]), "no step after the skip"
    assert all(torch.isfinite(tensor).all() for tensor in adapters[2].values())


FULL_TWO_RANKS = ["--tuner_type", "full", "--use_cpu", "true", "--save_steps", "1", "--save_only_model", "false"]
"""Full tuning on gloo ranks, a checkpoint after every step (transformers refuses ``--save_only_model true`` with
swift's FSDP2 state dict type, SHARDED_STATE_DICT)."""
LORA_TWO_RANKS = ["--tuner_type", "lora", "--use_cpu", "true", "--save_steps", "1", "--save_only_model", "false"]
"""The same with LoRA (swift's default targets: the language model's linear layers)."""


def two_full_ranks(swift_dpo, model, model_dir, name, env, extra, max_steps=3):
    env = {"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()), **env}
    run = swift_dpo(
        model, num_rows=8, max_steps=max_steps, extra_args=[*FULL_TWO_RANKS, *extra], env_extra=env,
        output_name=name, model_dir=model_dir,
    )  # fmt: skip
    assert run.returncode == 0 and "world_size: 2" in run.stdout + run.stderr, run.tail()
    return run


def with_gate(env, folder) -> dict:
    """``env`` with accelerate's FSDP gate opened for the CPU ranks (tests/support/fsdp_on_cpu.py)."""
    return merged_environments(gate_env(folder), env)


@pytest.mark.reliability("ms-swift", row="fsdp2")
def test_fsdp2_trains_as_ddp_skips_a_one_rank_nan_on_both_and_resumes_from_its_sharded_checkpoint(
    tmp_path, swift_dpo, qwen2_vl, plugin_file
):
    """swift's own FSDP2 path (``--fsdp fsdp2``: its fsdp2.json, accelerate's ``fully_shard``, sharded
    checkpoints), with accelerate's device gate opened for these CPU ranks (tests/support/fsdp_on_cpu.py;
    docs/scaling.md). Full tuning of the tiny Qwen2-VL, a NaN loss on rank 1 at step 1; then the same command
    resumed from the sharded checkpoint-2 ends where the uninterrupted run ends."""
    config = tmp_path / "vlm_dpo.yaml"
    config.write_text(yaml.safe_dump({"loss": {"type": "sigmoid"}}))  # the plugins compute the loss: one to poison
    fault = install_fault_plugin(tmp_path / "plugins", fault="loss-nan", steps=[1], only_rank=1)
    fault["VLM_DPO_CONFIG"] = str(config)
    sharded_env = with_gate(fault, tmp_path / "gate")
    model_dir = qwen2_vl.build(tmp_path / "model")

    def launch(name, env, *extra):
        return two_full_ranks(swift_dpo, qwen2_vl, model_dir, name, env, ["--external_plugins", plugin_file, *extra])

    sharded = launch("fsdp2", sharded_env, "--fsdp", "fsdp2")
    ddp = launch("ddp", fault)
    checkpoint = sharded.output_dir / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir(), sorted(path.name for path in checkpoint.iterdir())
    assert (checkpoint / "optimizer_0").is_dir(), sorted(path.name for path in checkpoint.iterdir())
    assert_one_rank_fault_skipped_on_both(sharded.stdout + sharded.stderr)
    for mine, theirs in zip(sharded.logged_steps(), ddp.logged_steps(), strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            if not math.isnan(theirs[key]):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (key, mine, theirs)
    for rank in (0, 1):
        state = json.loads((checkpoint / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())
        assert state["guards"]["skipped_steps"] == 1, (rank, state["guards"])

    # Step 3 again, from the sharded checkpoint-2 (the skip at step 1 is behind it: only restored state counts it).
    resumed = launch("resumed", sharded_env, "--fsdp", "fsdp2", "--resume_from_checkpoint", str(checkpoint))
    output = resumed.stdout + resumed.stderr
    assert "[test_fault_injection]" not in output and SKIP_LINE not in output, resumed.tail()
    steps = resumed.logged_steps()
    assert [entry["global_step/max_steps"] for entry in steps] == ["3/3"], steps
    assert steps[-1]["loss"] == pytest.approx(sharded.logged_steps()[-1]["loss"], rel=1e-6), (steps, sharded.tail())
    straight, again = (run.output_dir / "checkpoint-3" for run in (sharded, resumed))
    # AdamW's moments and step counts too: an optimizer restarted at the resume moves every weight elsewhere.
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert_same_tensors(
            flat_tensors(sharded_checkpoint(straight / part, tmp_path / f"straight-{part}.pt")),
            flat_tensors(sharded_checkpoint(again / part, tmp_path / f"resumed-{part}.pt")),
        )
    # The guards' state goes on from the checkpoint: the skip counted before it, each rank's own loss window.
    for rank in (0, 1):
        mine, theirs = (
            json.loads((folder / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())["guards"]
            for folder in (again, straight)
        )
        assert mine == theirs and mine["skipped_steps"] == 1, (rank, mine, theirs)


def test_fsdp2_with_lora_on_llava_trains_as_ddp_and_skips_a_one_rank_nan_on_both(
    tmp_path, swift_dpo, llava, plugin_file
):
    """``swift rlhf --fsdp fsdp2 --tuner_type lora`` on the tiny LLaVA (swift's ``llava1_5_hf``; its fsdp2.json:
    auto-wrap by ``_no_split_modules``, activation checkpointing, SHARDED_STATE_DICT), the gate opened; a NaN loss
    on rank 1 at step 1. The same run under DDP is the reference. Under FSDP2 with LoRA the Trainer saves the
    adapter alone, as a distributed checkpoint (``pytorch_model_fsdp_0``: the LoRA tensors, named as in
    ``adapter_model.safetensors``), and swift's own ``adapter_model.safetensors``/``adapter_config.json`` are not
    written; the frozen base is checked from the whole model gathered at the end
    (``tests/support/full_weights_plugin.py``)."""
    import torch
    from safetensors.torch import load_file
    from saved_models import live_weights, without_adapters

    config = tmp_path / "vlm_dpo.yaml"
    config.write_text(yaml.safe_dump({"loss": {"type": "sigmoid"}}))  # the plugins compute the loss: one to poison
    fault = install_fault_plugin(tmp_path / "plugins", fault="loss-nan", steps=[1], only_rank=1)
    fault["VLM_DPO_CONFIG"] = str(config)
    model_dir = llava.build(tmp_path / "model")

    def launch(name, env, *extra):
        env = {
            **install_full_weights(tmp_path / f"weights-{name}", tmp_path / f"{name}-final.pt", env),
            "NPROC_PER_NODE": "2",
            "MASTER_PORT": str(free_port()),
        }
        run = swift_dpo(
            llava, num_rows=8, max_steps=3, extra_args=[*LORA_TWO_RANKS, "--external_plugins", plugin_file, *extra],
            env_extra=env, output_name=name, model_dir=model_dir,
        )  # fmt: skip
        assert run.returncode == 0 and "world_size: 2" in run.stdout + run.stderr, run.tail()
        return run

    sharded = launch("fsdp2", with_gate(fault, tmp_path / "gate"), "--fsdp", "fsdp2")
    ddp = launch("ddp", fault)
    # Really FSDP2 over the PeftModel: fsdp2.json's auto-wrap makes each of _no_split_modules present a unit (the
    # language and vision layers and CLIP's vision embeddings, checkpointed; not the CLIPTextEmbeddings LLaVA's CLIP
    # also names, which accelerate 1.16 leaves out), the embeddings and the LM head units of their own, the root the
    # rest (the projector). And the DDP run has none.
    units = "CLIPEncoderLayer,CLIPEncoderLayer,CLIPVisionEmbeddings,Embedding,Linear,LlamaDecoderLayer,"
    units += "LlamaDecoderLayer"
    for rank in (0, 1):
        line = f"[test_full_weights] rank {rank}: fsdp_version=2 deepspeed_stage=None uses_peft=True "
        line += f"FSDPPeftModelForCausalLM units={units},"
        assert f"{line}PeftModelForCausalLM\n" in sharded.stdout + sharded.stderr, sharded.tail()
        line = f"[test_full_weights] rank {rank}: fsdp_version=None deepspeed_stage=None uses_peft=True "
        line += "PeftModelForCausalLM units=\n"
        assert line in ddp.stdout + ddp.stderr, ddp.tail()
    for run in (sharded, ddp):
        assert_one_rank_fault_skipped_on_both(run.stdout + run.stderr)
        for rank in (0, 1):
            state = json.loads((run.output_dir / "checkpoint-3" / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())
            assert state["guards"]["skipped_steps"] == 1, (run.output_dir.name, rank, state["guards"])
    logged = sharded.logged_steps()
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6), logged  # LoRA's B starts at zero: policy = ref
    for mine, theirs in zip(logged, ddp.logged_steps(), strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            if not math.isnan(theirs[key]):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (key, mine, theirs)

    # What the FSDP2 checkpoint holds: the adapter's tensors (DCP), AdamW's state for them alone, no safetensors.
    def saved(step):
        folder = sharded.output_dir / f"checkpoint-{step}"
        # The Trainer's save_model calls swift's _save (the adapter's files, args.json) only with FULL_STATE_DICT.
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert not (folder / name).exists(), sorted(path.name for path in folder.iterdir())
        model = sharded_checkpoint(folder / "pytorch_model_fsdp_0", tmp_path / f"{step}-model.pt")["model"]
        optimizer = sharded_checkpoint(folder / "optimizer_0", tmp_path / f"{step}-optimizer.pt")["optimizer"]
        return model, optimizer

    (before, before_moments), (after, after_moments), (last, last_moments) = map(saved, (1, 2, 3))
    adapter = load_file(ddp.output_dir / "checkpoint-3" / "adapter_model.safetensors")
    assert all(".lora_" in name for name in adapter) and len(adapter) == 28, sorted(adapter)  # 2 layers x 7 x A, B
    assert_same_tensors(adapter, last, rtol=1e-5)  # the same keys, and the same LoRA weights as DDP's
    assert {name.replace(".default.", ".") for name in last_moments["state"]} == set(adapter), last_moments["state"]
    assert_same_tensors(flat_tensors(before), flat_tensors(after), rtol=0)  # the skipped step moved nothing
    assert_same_tensors(flat_tensors(before_moments), flat_tensors(after_moments), rtol=0)
    assert not any(after[name].equal(last[name]) for name in last if ".lora_B." in name)

    # The whole model at the end: the LoRA weights trained, the base language model, vision tower and projector
    # are as loaded, under FSDP2 (gathered from the shards) as under DDP.
    initial = live_weights(model_dir)
    for run in (sharded, ddp):
        final = torch.load(tmp_path / f"{run.output_dir.name}-final.pt")
        lora = {name.replace(".default.", "."): tensor for name, tensor in final.items() if ".lora_" in name}
        base = without_adapters(final)
        assert base.keys() == initial.keys(), sorted(set(base) ^ set(initial))[:10]
        assert {llava.part(name) for name in base} == {"vision", "aligner", "language"}
        for name, tensor in initial.items():
            assert base[name].equal(tensor), (run.output_dir.name, name)
        assert_same_tensors(adapter, lora, rtol=1e-5)
        assert all(lora[name].abs().max() > 0 for name in lora if ".lora_B." in name)


def test_an_unfreeze_stage_trains_the_aligner_from_its_step_under_ddp_fsdp2_and_zero_alike(
    tmp_path, swift_dpo, qwen2_vl, plugin_file
):
    """``freeze.unfreeze`` (the merger, swift's aligner, the policy's projector group, from step 2) on two ranks, full
    tuning of the tiny Qwen2-VL, a checkpoint after every step, three ways (docs/scaling.md): under DDP, the measure,
    the merger is held trainable from the start and joins at its step; through ``swift rlhf --fsdp fsdp2`` (the gate
    opened) it is held the same way, each rank stepping its half; under a stock ZeRO-2 (``--deepspeed``), and a ZeRO-3
    with DeepSpeed's communication opened, it is in ZeRO's partitioned optimizer from the start, inert until its
    stage. Every checkpoint's weights, the losses and the norms equal the DDP run's.

    The runs share one command but for ``--save_only_model``: false under DDP and FSDP2 (transformers refuses true
    with swift's FSDP2 state dict type, SHARDED_STATE_DICT; under DDP it only adds the optimizer's files), true under
    ZeRO (its weights are whole in ``model.safetensors``; no ZeRO optimizer checkpoint to write). DDP and ZeRO
    run in fp32 explicitly (``--fp16 false --bf16 false``: swift turns fp16 on for float32 weights, which a ZeRO
    config's "auto" would take up); FSDP2 runs as users launch it (accelerate enables fp16 only off CPU, so the
    DDP measure is the one it always had)."""
    pytest.importorskip("deepspeed", reason="needs deepspeed in the ms-swift environment")
    import torch
    from deepspeed_on_cpu import gate_env as deepspeed_gate
    from fault_matrix import deepspeed_environment, zero_config
    from safetensors.torch import load_file
    from saved_models import live_weights

    config = tmp_path / "vlm_dpo.yaml"
    config.write_text(yaml.safe_dump({"freeze": {"unfreeze": [{"at_step": 2, "groups": ["projector"]}]}}))
    env = {"VLM_DPO_CONFIG": str(config)}
    zero2 = tmp_path / "zero2.json"
    zero2.write_text(json.dumps(zero_config(2)))
    model_dir = qwen2_vl.build(tmp_path / "model")
    extra = ["--external_plugins", plugin_file]
    fp32 = ["--fp16", "false", "--bf16", "false"]
    ddp = two_full_ranks(swift_dpo, qwen2_vl, model_dir, "ddp", env, [*extra, *fp32])
    sharded = two_full_ranks(swift_dpo, qwen2_vl, model_dir, "fsdp2", with_gate(env, tmp_path / "gate"),
                             [*extra, "--fsdp", "fsdp2"])  # fmt: skip
    zero = two_full_ranks(swift_dpo, qwen2_vl, model_dir, "zero2", {**env, **deepspeed_environment()},
                          [*extra, *fp32, "--save_only_model", "true", "--deepspeed", str(zero2)])  # fmt: skip
    # ZeRO-3 (DeepSpeed's communication opened, test_deepspeed_ranks.py) gathers the whole model into each
    # checkpoint's model.safetensors, in the model's own dtype (fp32), as ZeRO-2 writes it.
    settings = zero_config(3)
    settings["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    zero3_config = tmp_path / "zero3.json"
    zero3_config.write_text(json.dumps(settings))
    zero3_env = {**env, **deepspeed_environment(), **deepspeed_gate(tmp_path / "deepspeed-gate")}
    zero3 = two_full_ranks(swift_dpo, qwen2_vl, model_dir, "zero3", zero3_env,
                           [*extra, *fp32, "--save_only_model", "true", "--deepspeed", str(zero3_config)])  # fmt: skip
    for run in (sharded, ddp):
        output = run.stdout + run.stderr
        assert "of later unfreeze stages are trainable from the start" in output, run.tail()
        assert "vlm-dpo: step 2: unfroze" in output, run.tail()
    for run in (ddp, zero, zero3):
        assert (run.stdout + run.stderr).count("vlm-dpo: step 2: unfroze") == 2, run.tail()  # on each rank
    for stage, run in ((2, zero), (3, zero3)):
        output = run.stdout + run.stderr
        assert f"DeepSpeed ZeRO-{stage} optimizer holds" in output and "staged group(s)" in output, run.tail()

    initial = live_weights(model_dir)
    aligner = [name for name in initial if qwen2_vl.part(name) == "aligner"]
    vision = [name for name in initial if qwen2_vl.part(name) == "vision"]
    assert aligner and vision
    for step in (1, 2, 3):
        folder = sharded.output_dir / f"checkpoint-{step}" / "pytorch_model_fsdp_0"
        mine = sharded_checkpoint(folder, tmp_path / f"fsdp2-{step}.pt")["model"]
        theirs = load_file(ddp.output_dir / f"checkpoint-{step}" / "model.safetensors")
        for name in vision + (aligner if step < 3 else []):
            assert mine[name].equal(initial[name]) and theirs[name].equal(initial[name]), (step, name)
        assert any(not mine[name].equal(initial[name]) for name in initial if qwen2_vl.part(name) == "language")
        # The same updates as DDP's (its gradients averaged over both ranks), every weight.
        assert_same_tensors({name: theirs[name] for name in mine}, mine, rtol=1e-5)
        # ZeRO-2 and ZeRO-3: every weight as DDP's too, the same names. Under ZeRO-3 the gradients differ from DDP's
        # by rounding (about 1e-6 relative: the norms below), and AdamW divides each element by the root of its
        # running square, so where the ranks' contributions nearly cancel (LM-head rows of tokens the batch barely
        # predicts: a few dozen of Qwen2-VL's 4.8 million) rounding moves a weight by a fraction of the learning
        # rate (1e-3; seen: 4e-5). A tenth of it: a weight stepped wrongly moves by about a whole learning rate.
        for run, atol in ((zero, 1e-7), (zero3, 1e-4)):
            zeroed = load_file(run.output_dir / f"checkpoint-{step}" / "model.safetensors")
            assert zeroed.keys() == theirs.keys()
            for name, tensor in zeroed.items():
                message = f"{run.output_dir.name} checkpoint-{step}: {name}"
                torch.testing.assert_close(tensor, theirs[name], rtol=1e-5, atol=atol, msg=message)
    for name in aligner:
        # fully_shard splits dim 0 over the ranks: each rank's optimizer steps its own half.
        for rank, (before, after) in enumerate(zip(initial[name].chunk(2), mine[name].chunk(2), strict=True)):
            assert not after.equal(before), f"rank {rank}'s shard of {name} did not train at its stage"
    # ZeRO's merger, as the model loads it back: inert in ZeRO's optimizer until its stage, then trained.
    for run in (zero, zero3):
        saved = {step: live_weights(run.output_dir / f"checkpoint-{step}") for step in (1, 2, 3)}
        assert all(saved[step][name].equal(initial[name]) for step in (1, 2) for name in aligner), run.output_dir
        assert any(not saved[3][name].equal(initial[name]) for name in aligner), f"{run.output_dir}: not trained"
    losses = [[entry["loss"] for entry in run.logged_steps()] for run in (sharded, ddp)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-7), losses
    for run in (zero, zero3):
        for mine, theirs in zip(run.logged_steps(), ddp.logged_steps(), strict=True):
            for key in ("loss", "grad_norm"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (run.output_dir, key, mine, theirs)
    # The held gradient is left out of the guards' norm (clipped and voted on) until the stage, then counted.
    logged = sharded.logged_steps()
    groups = [{key.rsplit("/", 1)[1] for key in entry if key.startswith("vlm_dpo/grad_norm/")} for entry in logged]
    assert groups == [{"language"}, {"language"}, {"language", "projector"}], groups
    language, projector = logged[-1]["vlm_dpo/grad_norm/language"], logged[-1]["vlm_dpo/grad_norm/projector"]
    assert projector > 0 and logged[-1]["grad_norm"] == pytest.approx(math.hypot(language, projector), rel=1e-5)


def test_fsdp2_on_four_ranks_on_two_nodes_skips_a_nan_on_the_second_node_on_every_rank(
    tmp_path, swift_dpo, swift_dataset_writer, qwen2_vl, plugin_file
):
    """Two ``swift rlhf --fsdp fsdp2`` launches as two nodes of two ranks (NNODES/NODE_RANK), the gate opened: a
    NaN loss on rank 3 at step 1 is skipped by all four, each of which steps its own quarter of every weight."""
    import torch

    extra = [*FULL_TWO_RANKS, "--fsdp", "fsdp2"]
    first = two_nodes_with_a_nan_on_rank_3(
        tmp_path, swift_dpo, swift_dataset_writer, qwen2_vl, plugin_file, extra, gate=with_gate
    )

    # fully_shard splits each weight's dim 0 (and its AdamW state) over the four ranks: the checkpoints around the
    # skipped step, every rank's shard in them, hold the same weights, optimizer state and schedule.
    def saved(step):
        folder = first.output_dir / f"checkpoint-{step}"
        model, optimizer = (
            flat_tensors(sharded_checkpoint(folder / part, tmp_path / f"{step}-{part}.pt"))
            for part in ("pytorch_model_fsdp_0", "optimizer_0")
        )
        return model, optimizer, torch.load(folder / "scheduler.pt")["last_epoch"]

    (before, before_moments, before_lr), (after, after_moments, after_lr), (then, _, then_lr) = map(saved, (1, 2, 3))
    assert_same_tensors(before, after, rtol=0)
    assert_same_tensors(before_moments, after_moments, rtol=0)
    assert (before_lr, after_lr, then_lr) == (1, 1, 2)
    # The step after it trains on every rank: each quarter of every decoder weight moves, to finite values (not
    # the embeddings: the rows of tokens absent from the batch get no gradient).
    decoder = [name for name in then if ".language_model.layers." in name]
    assert decoder and all(torch.isfinite(tensor).all() for tensor in then.values())
    for name in decoder:
        quarters = zip(after[name].chunk(4), then[name].chunk(4), strict=True)
        assert all(not old.equal(new) for old, new in quarters), f"a rank's shard of {name} did not step"


def sharded_checkpoint(folder, converted) -> dict:
    """A distributed-checkpoint folder (accelerate's FSDP2 model or optimizer) as full tensors."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, converted)
    return torch.load(converted, weights_only=False)


def flat_tensors(tree, prefix="") -> dict:
    import torch

    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else None
    if items is not None:
        return {name: value for key, item in items for name, value in flat_tensors(item, f"{prefix}/{key}").items()}
    return {prefix: torch.tensor(tree)} if isinstance(tree, (int, float)) else {}


def assert_same_tensors(expected: dict, actual: dict, rtol=1e-6) -> None:
    import torch

    assert expected.keys() == actual.keys() and expected, sorted(set(expected) ^ set(actual))[:10]
    for name, tensor in expected.items():
        # Relative to each tensor's scale: AdamW's second moments are ~1e-9, under any fixed atol worth having.
        scale = tensor.abs().max().item() if tensor.is_floating_point() and tensor.numel() else 0.0
        torch.testing.assert_close(
            actual[name], tensor, rtol=rtol, atol=rtol * scale, msg=lambda default, name=name: f"{name}: {default}"
        )
