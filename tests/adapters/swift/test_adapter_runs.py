"""The adapter inside the real ``swift rlhf --rlhf_type dpo``: one ``--external_plugins`` flag, every hook active.

Each test runs ms-swift 4.6.0's own CLI as a subprocess (CPU, fp32, a few steps) on the tiny
Qwen2-VL, with ``--external_plugins "$(vlm-dpo swift-plugin)"`` and the plugin config in a YAML
file named by ``VLM_DPO_CONFIG``, and asserts on what the run wrote: console lines,
``logging.jsonl``, ``args.json``, checkpoints, saved weights.

First-step closed forms: with LoRA the reference is the policy with the adapter disabled and
LoRA's B matrices start at zero; with full tuning swift loads the reference as a copy. Either
way every log-ratio is 0 at step 0: sigmoid ln 2, hinge max(0, 1 - 0) = 1, mDPO 3 ln 2 (three
logistic terms at 0).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

swift = pytest.importorskip("swift", reason="needs the ms-swift test environment (ms-swift==4.6.0)")
if getattr(swift, "__file__", None) is None:  # a namespace package (e.g. a stray ``swift/`` folder), not ms-swift
    pytest.skip("`swift` is not ms-swift here", allow_module_level=True)

import torch  # noqa: E402
import yaml  # noqa: E402
from framework_cli import free_port  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from saved_models import live_weights  # noqa: E402

from vlm_dpo_plugins.diagnostics.replay import replay_detectors  # noqa: E402
from vlm_dpo_plugins.runlog.findings import FINDINGS_FILE, read_findings  # noqa: E402
from vlm_dpo_plugins.runlog.report import write_report  # noqa: E402

ACTIVE_LINE = "vlm-dpo: active in swift's DPO trainer"
LN2 = math.log(2)


def with_plugins(tmp_path: Path, plugin_file: str, config: dict | None = None, **env: str):
    """Extra command-line arguments and environment for a run with the adapter (and ``config`` as its YAML)."""
    environment = dict(env)
    if config is not None:
        path = tmp_path / "vlm_dpo.yaml"
        path.write_text(yaml.safe_dump(config))
        environment["VLM_DPO_CONFIG"] = str(path)
    return ["--external_plugins", plugin_file], environment


def output(run) -> str:
    return run.stdout + run.stderr


def steps(run) -> list[dict]:
    return run.logged_steps()


def checkpoint(run, step: int) -> Path:
    return run.output_dir / f"checkpoint-{step}"


def same(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.model_support("ms-swift", "stock", family="qwen2_vl")
def test_default_settings_train_exactly_as_swift_and_loading_twice_is_harmless(
    tmp_path, swift_dpo, qwen2_vl, plugin_file
):
    stock = swift_dpo(qwen2_vl, max_steps=3)
    assert stock.returncode == 0, stock.tail()
    assert "vlm-dpo:" not in output(stock) and "vlm_dpo" not in json.dumps(steps(stock)), "adapter active without flag"

    # The same file twice (swift caches it) and a copy under another path (a second module): one activation.
    copy = tmp_path / "copy" / "vlm_dpo_swift.py"
    copy.parent.mkdir()
    shutil.copy(plugin_file, copy)
    shutil.rmtree(stock.output_dir)
    plugged = swift_dpo(qwen2_vl, max_steps=3, extra_args=["--external_plugins", plugin_file, plugin_file, str(copy)])
    assert plugged.returncode == 0, plugged.tail()
    assert output(plugged).count(ACTIVE_LINE) == 1, plugged.tail()
    assert "loss swift's --loss_type" in output(plugged), plugged.tail()

    stock_steps, plugged_steps = steps(stock), steps(plugged)
    assert len(stock_steps) == len(plugged_steps) == 3
    for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected"):
        assert [s[key] for s in plugged_steps] == pytest.approx([s[key] for s in stock_steps], abs=1e-6), key
    assert plugged_steps[0]["vlm_dpo/skipped_steps"] == 0 and "collation/skipped_rows" in plugged_steps[0]


def test_swifts_mpo_and_the_registrys_train_as_swift_alone(tmp_path, swift_dpo, qwen2_vl, plugin_file):
    """MPO as swift ships it (``--loss_type sigmoid bco_pair sft`` with ``--loss_weights``, a running BCO baseline):
    with the plugins on, swift's own loss code (every other hook on), then the registry's ``loss.type: mpo`` in its
    place, both equal to swift alone step by step."""
    mpo = ["--loss_type", "sigmoid", "bco_pair", "sft", "--loss_weights", "0.8", "0.2", "1.0"]
    stock = swift_dpo(qwen2_vl, max_steps=3, extra_args=mpo, output_name="stock")
    assert stock.returncode == 0, stock.tail()
    for name, swift_args, config, loss, reward_scale in (
        ("swift", mpo, None, "swift's --loss_type ['sigmoid', 'bco_pair', 'sft']", 1.0),
        # Swift logs the weighted sum of each term's rewards, and its sft term's are beta's log-ratios too (its
        # zeros are overwritten): 0.8 + 0.2 + 1.0 = 2 times what TRL, LLaMA-Factory and the registry log.
        ("registry", [], {"loss": {"type": "mpo"}}, "'mpo'", 2.0),
    ):
        (tmp_path / name).mkdir()
        extra, env = with_plugins(tmp_path / name, plugin_file, config)
        plugged = swift_dpo(
            qwen2_vl, max_steps=3, extra_args=[*swift_args, *extra], env_extra=env, output_name=name,
            model_dir=stock.model_dir,
        )  # fmt: skip
        assert plugged.returncode == 0, plugged.tail()
        assert f"loss {loss}" in output(plugged), plugged.tail()
        for mine, theirs in zip(steps(plugged), steps(stock), strict=True):
            for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "logps/chosen"):
                scale = reward_scale if key.startswith("rewards/") else 1.0
                # fp32 sums in another order: the loss (~12, the SFT term) within an ulp or two; a reward is beta
                # times the difference of two log-probs near -36, whose ulp is 4e-6: within a few of those.
                tolerance = dict(abs=5e-6) if key.startswith("rewards/") else dict(rel=1e-6, abs=1e-6)
                assert mine[key] * scale == pytest.approx(theirs[key], **tolerance), (name, key, mine, theirs)


def test_lora_hinge_loss_from_the_config_and_adapters_on_the_language_model_only(
    tmp_path, swift_dpo, qwen2_vl, plugin_file
):
    extra, env = with_plugins(tmp_path, plugin_file, {"loss": {"type": "hinge"}})
    run = swift_dpo(qwen2_vl, extra_args=["--tuner_type", "lora", *extra], env_extra=env)
    assert run.returncode == 0, run.tail()
    assert f"{ACTIVE_LINE} (settings from VLM_DPO_CONFIG=" in output(run) and "loss 'hinge'" in output(run)
    assert steps(run)[0]["loss"] == pytest.approx(1.0, abs=1e-6), steps(run)
    adapter = load_file(run.last_checkpoint() / "adapter_model.safetensors")
    assert adapter and not [key for key in adapter if qwen2_vl.part(key) != "language"], sorted(adapter)
    trained = [key for key, tensor in adapter.items() if "lora_B" in key and torch.count_nonzero(tensor)]
    assert trained, "no LoRA B matrix moved off zero"


@pytest.mark.model_support("ms-swift", "freeze", family="qwen2_vl")
def test_mdpo_full_tuning_with_the_vision_tower_and_merger_frozen(tmp_path, swift_dpo, qwen2_vl, plugin_file):
    extra, env = with_plugins(tmp_path, plugin_file, {"loss": {"type": "mdpo"}})
    run = swift_dpo(qwen2_vl, extra_args=extra, env_extra=env)
    assert run.returncode == 0, run.tail()
    first = steps(run)[0]
    assert first["loss"] == pytest.approx(3 * LN2, abs=1e-5), first
    assert first["mdpo/conditional_loss"] == pytest.approx(LN2, abs=1e-6), first
    moved, kept = run.weight_changes()
    assert not moved["vision"] and not moved["aligner"], moved
    assert moved["language"] and not kept["language"], kept["language"]


def test_projector_unfreezes_at_its_stage_with_its_own_learning_rate(tmp_path, swift_dpo, qwen2_vl, plugin_file):
    config = {
        "freeze": {
            "trainable": ["language"],
            "unfreeze": [{"at_step": 2, "groups": ["projector"]}],
            "learning_rates": {"projector": 1e-4},
        }
    }
    extra, env = with_plugins(tmp_path, plugin_file, config)
    run = swift_dpo(
        qwen2_vl,
        max_steps=3,
        extra_args=["--save_steps", "1", "--save_only_model", "false", *extra],
        env_extra=env,
    )
    assert run.returncode == 0, run.tail()
    assert "step 2: unfroze" in output(run) and "projector parameter(s)" in output(run), run.tail()
    # Swift's freeze flags were written from the policy: the projector trains at some step.
    assert run.args_json()["freeze_aligner"] is True  # args.json is saved before the plugin rewrites the flags
    original = live_weights(run.model_dir)
    saved = [live_weights(checkpoint(run, step)) for step in (1, 2, 3)]

    def part(tensors: dict, name: str) -> dict:
        return {key: value for key, value in tensors.items() if qwen2_vl.part(key) == name}

    assert same(part(original, "aligner"), part(saved[1], "aligner")), "the projector trained before its stage"
    assert not same(part(saved[1], "aligner"), part(saved[2], "aligner")), "the projector did not train after it"
    assert same(part(original, "vision"), part(saved[2], "vision")), "the frozen vision tower changed"
    groups = torch.load(checkpoint(run, 3) / "optimizer.pt", weights_only=False)["param_groups"]
    assert sorted({group["lr"] for group in groups}) == [1e-4, 1e-3], groups


def test_swift_freeze_and_learning_rate_flags_drive_the_policy(tmp_path, swift_dpo, qwen2_vl, plugin_file):
    extra, env = with_plugins(tmp_path, plugin_file)
    run = swift_dpo(
        qwen2_vl,
        max_steps=1,
        extra_args=["--freeze_aligner", "false", "--aligner_lr", "2e-4", "--save_only_model", "false", *extra],
        env_extra=env,
    )
    assert run.returncode == 0, run.tail()
    assert "trainable: vision 0/" in output(run) and "projector 20,704/20,704" in output(run), run.tail()
    # The start line says swift's flags took part, not "settings from defaults" alone.
    assert "(settings from defaults, with swift's --freeze_aligner, --aligner_lr)" in output(run), run.tail()
    groups = torch.load(run.last_checkpoint() / "optimizer.pt", weights_only=False)["param_groups"]
    assert sorted({group["lr"] for group in groups}) == [2e-4, 1e-3], groups
    moved, _ = run.weight_changes()
    assert moved["aligner"] and not moved["vision"], moved


def test_conflicting_settings_stop_with_both_names(tmp_path, swift_dpo, qwen2_vl, plugin_file):
    extra, env = with_plugins(tmp_path, plugin_file, {"loss": {"beta": 0.3}})
    run = swift_dpo(qwen2_vl, max_steps=1, extra_args=["--beta", "0.2", *extra], env_extra=env)
    assert run.returncode != 0
    assert (
        "vlm_dpo_plugins.errors.ConfigError: swift's --beta is 0.2 and the plugin config's loss.beta is 0.3: "
        "set it in one place"
    ) in run.stderr, run.tail()
    # Before swift loads a model or reads a row (on a real run that is hours of dataset encoding).
    assert "_prepare_model_tokenizer" in run.stderr and "_prepare_dataset" not in run.stderr, run.tail()


def test_findings_reach_the_console_and_logging_jsonl(tmp_path, swift_dpo, qwen2_vl, plugin_file):
    # A learning rate too small to move anything: the loss sits at ln 2 with zero margins, and the detector says so.
    # (Identical pairs cannot show it here: swift's own preprocessing drops a row whose rejected answer equals
    # the chosen one.)
    extra, env = with_plugins(tmp_path, plugin_file, {"diagnostics": {"stall_steps": 2}})
    run = swift_dpo(qwen2_vl, max_steps=3, extra_args=["--learning_rate", "1e-12", *extra], env_extra=env)
    assert run.returncode == 0, run.tail()
    assert "loss-stuck-at-ln2" in output(run), run.tail()
    logged = [finding for entry in steps(run) for finding in entry.get("vlm_dpo_findings", [])]
    assert logged and all("loss-stuck-at-ln2" in finding for finding in logged), steps(run)
    assert [(f["code"], f["step"]) for f in read_findings(run.output_dir / FINDINGS_FILE)] == [("loss-stuck-at-ln2", 2)]
    # vlm-dpo report reads swift's own logging.jsonl: the three steps and the finding, on the page.
    report = write_report(run.output_dir, extra_findings=replay_detectors)
    assert report.run.framework == "swift" and [r["step"] for r in report.run.records] == [1, 2, 3]
    assert [f["code"] for f in report.findings] == ["loss-stuck-at-ln2"]
    assert "loss-stuck-at-ln2" in report.html_path.read_text()


def test_lora_vision_adapters_wait_for_their_unfreeze_stage(tmp_path, swift_dpo, qwen2_vl, plugin_file):
    # The stage makes swift put LoRA on the vision tower from the start (--freeze_vit written false); the policy keeps
    # those adapters frozen until step 2, through every reference pass (PEFT re-marks them trainable after it).
    extra, env = with_plugins(tmp_path, plugin_file, {"freeze": {"unfreeze": [{"at_step": 2, "groups": ["vision"]}]}})
    run = swift_dpo(
        qwen2_vl, max_steps=3, extra_args=["--tuner_type", "lora", "--save_steps", "1", *extra], env_extra=env
    )
    assert run.returncode == 0, run.tail()
    assert "step 2: unfroze" in output(run) and "vision parameter(s)" in output(run), run.tail()

    def vision_lora_b(step: int) -> list[torch.Tensor]:
        weights = load_file(checkpoint(run, step) / "adapter_model.safetensors")
        return [tensor for name, tensor in weights.items() if qwen2_vl.part(name) == "vision" and "lora_B" in name]

    assert vision_lora_b(2) and all(not torch.count_nonzero(tensor) for tensor in vision_lora_b(2))
    assert any(torch.count_nonzero(tensor) for tensor in vision_lora_b(3)), "vision adapters never trained"


def test_cpu_ranks_without_use_cpu_are_reported_as_unsynchronised(tmp_path, swift_dpo, qwen2_vl, plugin_file):
    extra, env = with_plugins(tmp_path, plugin_file, NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    # Both copies believe they write the output folder: no checkpoint, so they cannot race on one.
    run = swift_dpo(
        qwen2_vl, max_steps=1, extra_args=["--tuner_type", "lora", "--save_strategy", "no", *extra], env_extra=env
    )
    assert run.returncode == 0, run.tail()
    assert (
        "vlm-dpo: NPROC_PER_NODE=2 on a machine without a GPU and without --use_cpu true: swift starts 2 independent "
        "copies of the run whose gradients are never averaged"
    ) in output(run), run.tail()


PACKED_LINE = "vlm-dpo: sharing.prompt: each pair runs as one row [prompt, chosen, rejected]"


@pytest.mark.model_support("ms-swift", "sharing", family="qwen2_vl")
@pytest.mark.parametrize("tuner", ["full", "lora"])
def test_shared_pairs_train_like_two_rows_per_pair(tmp_path, swift_dpo, qwen2_vl, plugin_file, tuner):
    # The plugins' loss (swift's own runs its own forwards): packed pairs, Qwen2-VL's mrope positions from swift's
    # template packed as they are; full tuning lends the policy's image features to swift's separate reference.
    logs, steps_of = {}, {}
    for name, sharing in (("shared", {}), ("unshared", {"prompt": False, "vision_features": False})):
        (tmp_path / name).mkdir()
        extra, env = with_plugins(tmp_path / name, plugin_file, {"loss": {"type": "sigmoid"}, "sharing": sharing})
        # SGD: AdamW turns fp32 rounding in a near-zero gradient into a step of the full learning rate.
        options = ["--tuner_type", tuner, "--optim", "sgd", "--learning_rate", "0.1", *extra]
        run = swift_dpo(qwen2_vl, max_steps=3, extra_args=options, env_extra=env)
        assert run.returncode == 0, run.tail()
        logs[name], steps_of[name] = output(run), steps(run)
        shutil.rmtree(run.output_dir)  # the factory writes every run to the same folder
    assert PACKED_LINE in logs["shared"] and "runs unpacked" not in logs["shared"], logs["shared"][-3000:]
    assert PACKED_LINE not in logs["unshared"]
    shared, unshared = steps_of["shared"], steps_of["unshared"]
    assert len(shared) == len(unshared) == 3
    for mine, theirs in zip(shared, unshared, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (key, mine, theirs)
        for key in ("logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (key, mine, theirs)
