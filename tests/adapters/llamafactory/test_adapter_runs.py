"""The adapter inside the real ``llamafactory-cli train``: installed means active, and every hook shows in the output.

Each test runs LLaMA-Factory 0.9.5's own CLI as a subprocess (stage ``dpo``, CPU, fp32, a few
steps) on the tiny LLaVA or Qwen2-VL, with the package installed in the environment the way a
user installs it, and asserts on what the run wrote: console lines, ``trainer_state.json``,
``trainer_log.jsonl``, checkpoints, saved weights.

First-step closed forms: with LoRA the reference is the policy with the adapter disabled, and
LoRA's B matrices start at zero, so at step 0 every log-ratio is 0 and the margin h = 0:
sigmoid -log σ(0) = ln 2, hinge max(0, 1 - h) = 1, IPO (h - 1/(2β))² = 1/(2β)² = 25 for
β = 0.1, mDPO = 3 ln 2 (three logistic terms at 0). Full tuning starts equal too (the reference
model is a copy).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")

import torch  # noqa: E402
from fault_plugin import install as install_fault_plugin  # noqa: E402
from llamafactory_runs import (  # noqa: E402
    BuiltOnUse,
    TINY_MODELS,
    changed_parts,
    dpo_config,
    run_llamafactory,
    write_dataset,
    write_mixed_dataset,
)
from safetensors.torch import load_file  # noqa: E402

from vlm_dpo_plugins.diagnostics.replay import replay_detectors  # noqa: E402
from vlm_dpo_plugins.runlog.findings import FINDINGS_FILE, read_findings  # noqa: E402
from vlm_dpo_plugins.runlog.report import write_report  # noqa: E402

ACTIVE_LINE = "vlm-dpo: active in LLaMA-Factory's DPO trainer"
DISABLED = {"VLM_DPO_LLAMAFACTORY": "0"}
LN2 = math.log(2)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return BuiltOnUse(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_dataset(directory)
    return directory


def train(tmp_path, models, dataset, model: str, finetuning: str, env=None, nproc=None, **overrides):
    config = dpo_config(TINY_MODELS[model], models[model], dataset, tmp_path / "out", finetuning, **overrides)
    return run_llamafactory(tmp_path, config, env=env, nproc=nproc)


def lora_keys(output_dir: Path) -> list[str]:
    return sorted(load_file(output_dir / "adapter_model.safetensors"))


def test_qwen2_vl_lora_hinge_computes_hinge(tmp_path, models, dataset):
    run = train(tmp_path, models, dataset, "qwen2_vl", "lora", pref_loss="hinge")
    assert run.returncode == 0, run.log()
    assert ACTIVE_LINE in run.output and "loss 'hinge'" in run.output, run.log()
    assert run.losses[0] == pytest.approx(1.0, abs=1e-6), run.losses
    # The plugins' metrics next to LLaMA-Factory's, in trainer_state.json and on trainer_log.jsonl's lines.
    first = run.step_logs[0]
    assert first["vlm_dpo/skipped_steps"] == 0 and first["rewards/margins"] == 0.0, first
    assert "vlm_dpo/grad_norm/language" in first and "collation/skipped_rows" in first, first
    step_lines = [line for line in run.trainer_log if "loss" in line]  # the last line is the run's summary
    assert [line["vlm_dpo/skipped_steps"] for line in step_lines] == [0.0, 0.0, 0.0], run.trainer_log
    # Frozen groups: LLaMA-Factory puts no adapter on the vision tower or the merger, and the policy agrees.
    parts = {TINY_MODELS["qwen2_vl"].part(name) for name in lora_keys(run.output_dir)}
    assert parts == {"language"}, lora_keys(run.output_dir)
    assert "vision 0/" in run.output and "projector 0/" in run.output, run.log()


def test_llava_lora_ipo_computes_ipo(tmp_path, models, dataset):
    run = train(tmp_path, models, dataset, "llava", "lora", pref_loss="ipo")
    assert run.returncode == 0, run.log()
    assert run.losses[0] == pytest.approx(1 / (2 * 0.1) ** 2, rel=1e-6), run.losses


def test_disabled_is_llamafactorys_own_training(tmp_path, models, dataset):
    # LLaMA-Factory's own code path, bug included: hinge trains sigmoid, and no trace of the adapter.
    run = train(tmp_path, models, dataset, "qwen2_vl", "lora", env=DISABLED, pref_loss="hinge")
    assert run.returncode == 0, run.log()
    assert run.losses[0] == pytest.approx(LN2, abs=1e-6), run.losses
    assert "vlm-dpo" not in run.output and "vlm_dpo" not in run.output, run.log()
    assert not any(key.startswith("vlm_dpo/") for key in run.step_logs[0]), run.step_logs[0]


@pytest.mark.model_support("LLaMA-Factory", "stock", family="qwen2_vl")
def test_defaults_train_like_llamafactory(tmp_path, models, dataset):
    # No vlm_dpo section, nothing to fix: the same losses and margins as LLaMA-Factory itself, step by step, up to
    # float rounding (the plugins sum fp32 log-probs chunk by chunk; after two updates margins of ~1e-3 differ ~1e-6).
    ours = train(tmp_path / "ours", models, dataset, "qwen2_vl", "lora", pref_loss="sigmoid")
    stock = train(tmp_path / "stock", models, dataset, "qwen2_vl", "lora", env=DISABLED, pref_loss="sigmoid")
    assert ours.returncode == 0 and stock.returncode == 0, ours.log() + stock.log()
    # pref_loss and pref_beta are written in LLaMA-Factory's YAML: the settings are not the plugin defaults alone.
    origin = "(settings from defaults, with LLaMA-Factory's pref_loss, pref_beta)"
    assert f"{ACTIVE_LINE} {origin}" in ours.output, ours.log()
    assert len(ours.losses) == len(stock.losses) == 3
    for mine, theirs in zip(ours.step_logs, stock.step_logs, strict=True):
        for key in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), (key, mine, theirs)


def test_the_sft_term_alone_trains_as_llamafactory_alone(tmp_path, models, dataset):
    # pref_ftx without BCO: the plugins compute the loss and add LLaMA-Factory's length-averaged term themselves.
    ours = train(tmp_path / "ours", models, dataset, "qwen2_vl", "lora", pref_loss="sigmoid", pref_ftx=0.5)
    stock = train(
        tmp_path / "stock", models, dataset, "qwen2_vl", "lora", env=DISABLED, pref_loss="sigmoid", pref_ftx=0.5
    )
    assert ours.returncode == 0 and stock.returncode == 0, ours.log() + stock.log()
    assert "loss 'sigmoid'" in ours.output, ours.log()
    assert len(ours.losses) == len(stock.losses) == 3
    for mine, theirs in zip(ours.step_logs, stock.step_logs, strict=True):
        for key in ("loss", "rewards/margins", "rewards/chosen", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), (key, mine, theirs)


def test_llamafactorys_mpo_and_the_registrys_train_as_llamafactory_alone(tmp_path, models, dataset):
    """MPO as LLaMA-Factory ships it: sigmoid, BCO (``pref_bco_weight`` 0.25: weights 0.8 and 0.2, a running reward
    baseline) and the SFT term (``pref_ftx``). With the plugins, first LLaMA-Factory's own code (every other hook
    on), then the registry's ``loss.type: mpo`` in its place; both equal LLaMA-Factory alone, step by step.

    One pair per micro-batch: LLaMA-Factory's SFT term averages each chosen response over its tokens, the
    registry's (TRL's, ms-swift's) averages the batch's chosen tokens, which is the same for one pair."""
    batches = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2)  # pref_loss: its default, sigmoid
    mpo = dict(pref_bco_weight=0.25, pref_ftx=1.0)
    stock = train(tmp_path / "stock", models, dataset, "qwen2_vl", "lora", env=DISABLED, **batches, **mpo)
    assert stock.returncode == 0, stock.log()
    assert len(stock.losses) == 3
    for name, options, computed_by in (
        ("own", mpo, "LLaMA-Factory's own"),
        ("registry", dict(vlm_dpo={"loss": {"type": "mpo"}}), "'mpo'"),
    ):
        ours = train(tmp_path / name, models, dataset, "qwen2_vl", "lora", **batches, **options)
        assert ours.returncode == 0, ours.log()
        assert f"loss {computed_by}" in ours.output, ours.log()
        for mine, theirs in zip(ours.step_logs, stock.step_logs, strict=True):
            for key in ("loss", "rewards/margins", "rewards/chosen", "grad_norm"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), (name, key, mine, theirs)
    # The registry's terms on LLaMA-Factory's own log line too.
    assert {"mpo/quality_loss", "mpo/reward_baseline"} <= set(ours.trainer_log[0]), ours.trainer_log[0]


def test_llava_full_frozen_vision_with_projector_unfrozen_later(tmp_path, models, dataset):
    section = {
        "freeze": {"unfreeze": [{"at_step": 2, "groups": ["projector"]}], "learning_rates": {"projector": 5.0e-4}}
    }
    run = train(tmp_path, models, dataset, "llava", "full", freeze_vision_tower=True, max_steps=3, vlm_dpo=section)
    assert run.returncode == 0, run.log()
    assert run.losses[0] == pytest.approx(LN2, abs=1e-6), run.losses
    assert "step 2: unfroze" in run.output and "projector parameter(s)" in run.output, run.log()
    before = load_file(models["llava"] / "model.safetensors")
    after = load_file(run.output_dir / "model.safetensors")
    assert before.keys() == after.keys(), sorted(set(before) ^ set(after))
    parts = changed_parts(before, after, TINY_MODELS["llava"].part)
    assert parts["vision"]["changed"] == [], parts["vision"]["changed"]
    assert parts["projector"]["changed"], "the projector unfrozen at step 2 did not train"
    assert parts["language"]["changed"], "the language model did not train"


@pytest.mark.model_support("LLaMA-Factory", "freeze", family="qwen2_vl")
def test_qwen2_vl_full_mdpo_keeps_the_vision_tower(tmp_path, models, dataset):
    run = train(tmp_path, models, dataset, "qwen2_vl", "full", vlm_dpo={"loss": {"type": "mdpo"}})
    assert run.returncode == 0, run.log()
    assert run.losses[0] == pytest.approx(3 * LN2, abs=1e-5), run.losses
    assert run.trainer_log[0]["mdpo/conditional_loss"] == pytest.approx(LN2, abs=1e-6), run.trainer_log[0]
    before = load_file(models["qwen2_vl"] / "model.safetensors")
    after = load_file(run.output_dir / "model.safetensors")
    parts = changed_parts(before, after, TINY_MODELS["qwen2_vl"].part)
    assert parts["vision"]["changed"] == [] and parts["projector"]["changed"] == [], parts
    assert parts["language"]["changed"], "the language model did not train"


def test_non_finite_gradient_is_skipped_with_optimizer_state_intact(tmp_path, models, dataset):
    # Step 1 (0-based) gets a NaN gradient; a checkpoint after every step shows what that step did.
    env = install_fault_plugin(tmp_path / "plugins", step=1)
    run = train(tmp_path, models, dataset, "llava", "lora", env=env, save_strategy="steps", save_steps=1)
    assert run.returncode == 0, run.log()
    assert "[test_fault_injection] grad-nan at step 1: nan gradient" in run.output, run.log()
    assert "optimizer step skipped on every rank" in run.output, run.log()
    assert [entry["vlm_dpo/skipped_steps"] for entry in run.step_logs] == [0.0, 1.0, 1.0], run.step_logs
    checkpoints = [run.output_dir / f"checkpoint-{step}" for step in (1, 2, 3)]
    weights = [load_file(folder / "adapter_model.safetensors") for folder in checkpoints]
    optimizers = [torch.load(folder / "optimizer.pt", weights_only=False)["state"] for folder in checkpoints]
    schedulers = [torch.load(folder / "scheduler.pt", weights_only=False)["last_epoch"] for folder in checkpoints]

    def same(first, second) -> bool:
        return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    assert same(weights[0], weights[1]), "the skipped step changed the weights"
    assert all(same(optimizers[0][i], optimizers[1][i]) for i in optimizers[0]), "the skipped step moved AdamW state"
    assert schedulers[:2] == [1, 1], schedulers  # the LR schedule did not advance
    assert not same(weights[1], weights[2]), "training did not continue after the skipped step"
    assert all(math.isfinite(value) for tensor in weights[2].values() for value in tensor.flatten().tolist())
    assert (checkpoints[1] / "vlm_dpo_plugins_state.rank0.json").exists()
    # The detectors name it once, at the Trainer's step 2, in trainer_log.jsonl and in the findings file ...
    logged = [finding for entry in run.trainer_log for finding in entry.get("vlm_dpo_findings", [])]
    assert len(logged) == 1 and logged[0].startswith("[warning] non-finite (step 2)"), logged
    assert [(f["code"], f["step"]) for f in read_findings(run.output_dir / FINDINGS_FILE)] == [("non-finite", 2)]
    # ... and vlm-dpo report reads LLaMA-Factory's logs: its trainer_state.json steps, the finding on the page.
    report = write_report(run.output_dir, extra_findings=replay_detectors)
    assert report.run.framework == "llamafactory" and [r["step"] for r in report.run.records] == [1, 2, 3]
    assert [f["code"] for f in report.findings] == ["non-finite"]


def test_conflicting_settings_stop_before_loading_the_model(tmp_path, models, dataset):
    run = train(tmp_path, models, dataset, "llava", "lora", pref_beta=0.2, vlm_dpo={"loss": {"beta": 0.3}})
    assert run.returncode != 0
    assert (
        "vlm_dpo_plugins.errors.ConfigError: LLaMA-Factory's pref_beta is 0.2 and vlm_dpo.loss.beta is 0.3: "
        "set it in one place"
    ) in run.stderr, run.log()


def test_torchrun_workers_are_active_on_both_ranks(tmp_path, models, dataset):
    # LLaMA-Factory re-executes itself under torchrun: each worker activates the adapter on its own.
    run = train(tmp_path, models, dataset, "llava", "lora", nproc=2, max_steps=2, save_strategy="steps", save_steps=2)
    assert run.returncode == 0, run.log()
    assert "world size: 2" in run.output and ACTIVE_LINE in run.output, run.log()
    state_files = sorted(path.name for path in (run.output_dir / "checkpoint-2").glob("vlm_dpo_plugins_state.*"))
    assert state_files == ["vlm_dpo_plugins_state.rank0.json", "vlm_dpo_plugins_state.rank1.json"], state_files
    assert run.losses[0] == pytest.approx(LN2, abs=1e-6) and all(math.isfinite(loss) for loss in run.losses)


def test_detector_findings_reach_llamafactorys_logs(tmp_path, models):
    # Every pair identical, kept on purpose (policy warn): the loss sits at ln 2 and the detector says why.
    import json

    data = tmp_path / "data"
    write_dataset(data)
    rows = json.loads((data / "tiny_pref.json").read_text())
    for row in rows:
        row["rejected"] = dict(row["chosen"])
    write_dataset(data, rows=rows)
    section = {"collation": {"policy": {"identical-pair": "warn"}}, "diagnostics": {"stall_steps": 2}}
    run = train(tmp_path, models, data, "llava", "lora", vlm_dpo=section)
    assert run.returncode == 0, run.log()
    assert "identical-pair (row 0, field 'rejected')" in run.output, run.log()
    assert "loss-stuck-at-ln2" in run.output, run.log()
    findings = [finding for line in run.trainer_log for finding in line.get("vlm_dpo_findings", [])]
    assert findings and all("loss-stuck-at-ln2" in finding for finding in findings), run.trainer_log


def test_qwen2_vl_lora_vision_adapters_wait_for_their_unfreeze_stage(tmp_path, models, dataset):
    # The stage makes LLaMA-Factory put LoRA on the vision tower from the start; the policy keeps those adapters
    # frozen until step 2, through every reference pass (PEFT re-marks adapters trainable after disabling them).
    section = {"freeze": {"unfreeze": [{"at_step": 2, "groups": ["vision"]}]}}
    run = train(tmp_path, models, dataset, "qwen2_vl", "lora", vlm_dpo=section, save_strategy="steps", save_steps=1)
    assert run.returncode == 0, run.log()
    assert "step 2: unfroze" in run.output and "vision parameter(s)" in run.output, run.log()
    qwen = TINY_MODELS["qwen2_vl"]

    def vision_lora_b(step: int) -> list[torch.Tensor]:
        weights = load_file(run.output_dir / f"checkpoint-{step}" / "adapter_model.safetensors")
        return [tensor for name, tensor in weights.items() if qwen.part(name) == "vision" and "lora_B" in name]

    assert vision_lora_b(2), "LLaMA-Factory put no LoRA on the vision tower although a stage unfreezes it"
    assert all(torch.count_nonzero(tensor) == 0 for tensor in vision_lora_b(2)), "vision adapters trained early"
    assert any(torch.count_nonzero(tensor) > 0 for tensor in vision_lora_b(3)), "vision adapters never trained"


def test_lora_projector_request_is_not_dropped_silently(tmp_path, models, dataset):
    run = train(
        tmp_path,
        models,
        dataset,
        "llava",
        "lora",
        max_steps=1,
        vlm_dpo={"freeze": {"trainable": ["language", "projector"]}},
    )
    assert run.returncode == 0, run.log()
    assert (
        "the freeze policy trains the projector group, but the framework made none of its parameters trainable: "
        "it stays frozen. With LoRA, LLaMA-Factory trains the projector only through additional_target"
    ) in run.output, run.log()


PACKED_LINE = "vlm-dpo: sharing.prompt: each pair runs as one row [prompt, chosen, rejected]"
UNSHARED = {"sharing": {"prompt": False, "vision_features": False}}


@pytest.mark.model_support("LLaMA-Factory", "sharing")
@pytest.mark.parametrize(("model", "finetuning"), [("llava", "full"), ("qwen2_vl", "lora")])
def test_shared_pairs_train_like_two_rows_per_pair(tmp_path, models, dataset, model, finetuning):
    # Full tuning: a separate reference model lends nothing but takes the policy's image features (vision frozen);
    # LoRA: the reference is the policy with its adapter off. Qwen2-VL's mrope positions come from LLaMA-Factory's
    # collator and are packed as they are.
    shared = train(tmp_path / "shared", models, dataset, model, finetuning)
    unshared = train(tmp_path / "unshared", models, dataset, model, finetuning, vlm_dpo=UNSHARED)
    assert shared.returncode == 0 and unshared.returncode == 0, shared.log() + unshared.log()
    assert PACKED_LINE in shared.output and "runs unpacked" not in shared.output, shared.log()
    assert PACKED_LINE not in unshared.output
    assert len(shared.step_logs) == len(unshared.step_logs) == 3
    for mine, theirs in zip(shared.step_logs, unshared.step_logs, strict=True):
        for key in ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (key, mine, theirs)
        for key in ("logps/chosen", "logps/rejected"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6), (key, mine, theirs)


@pytest.mark.model_support("LLaMA-Factory", "stock", family="gemma3")
@pytest.mark.model_support("LLaMA-Factory", "freeze", family="gemma3")
@pytest.mark.model_support("LLaMA-Factory", "sharing", family="gemma3")
def test_gemma3_trains_like_llamafactory_with_its_image_blocks_packed(tmp_path, models, dataset):
    # Gemma 3: the image-count check counts its soft tokens, and packed rows keep each image's tokens attending
    # both ways (the dense mask with the blocks), as LLaMA-Factory's two rows per pair do.
    ours = train(tmp_path / "ours", models, dataset, "gemma3", "full", pref_loss="sigmoid")
    stock = train(tmp_path / "stock", models, dataset, "gemma3", "full", env=DISABLED, pref_loss="sigmoid")
    assert ours.returncode == 0 and stock.returncode == 0, ours.log() + stock.log()
    assert PACKED_LINE in ours.output and "attend to each other both ways in training" in ours.output, ours.log()
    assert len(ours.step_logs) == len(stock.step_logs) == 3
    for mine, theirs in zip(ours.step_logs, stock.step_logs, strict=True):
        for key in ("loss", "rewards/margins", "rewards/chosen", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (key, mine, theirs)
    before = load_file(models["gemma3"] / "model.safetensors")
    after = load_file(ours.output_dir / "model.safetensors")
    assert before.keys() == after.keys(), sorted(set(before) ^ set(after))
    parts = changed_parts(before, after, TINY_MODELS["gemma3"].part)
    assert parts["vision"]["changed"] == [] and parts["projector"]["changed"] == [], parts
    assert parts["language"]["changed"], "the language model did not train"


@pytest.mark.parametrize("model", ["qwen2_vl", "llava"])
def test_text_only_batches_train_as_llamafactory_trains_them(tmp_path, models, model):
    # LLaMA-Factory's collator gives a batch without images a white stand-in image (its tokens unattended), so
    # that under ZeRO-3/FSDP every rank runs the vision tower (docs/scaling.md): the plugins' collation, packing
    # and checks must take such batches without a finding and train them as stock does. In file order, one pair
    # per step: image, text-only, image, text-only.
    dataset = write_mixed_dataset(tmp_path / "data")
    options = dict(per_device_train_batch_size=1, max_steps=4, disable_shuffling=True)
    ours = train(tmp_path / "ours", models, dataset, model, "full", **options)
    stock = train(tmp_path / "stock", models, dataset, model, "full", env=DISABLED, **options)
    assert ours.returncode == 0 and stock.returncode == 0, ours.log() + stock.log()
    assert len(ours.step_logs) == len(stock.step_logs) == 4
    for mine, theirs in zip(ours.step_logs, stock.step_logs, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), (key, mine, theirs)
