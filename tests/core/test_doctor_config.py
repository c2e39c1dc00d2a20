"""``vlm-dpo doctor --config``: each framework's config read with its defaults, each known cause named by its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm_dpo_plugins.cli import main
from vlm_dpo_plugins.doctor.rules import lint
from vlm_dpo_plugins.doctor.setup import read_setup

BROKEN_LLAMAFACTORY = """\
model_name_or_path: Qwen/Qwen2-VL-2B-Instruct
stage: dpo
finetuning_type: lora
lora_rank: 64
lora_alpha: 8
lora_target: q_proj,v_proj,visual.patch_embed.proj,visual.blocks.0.attn.qkv
pref_loss: hinge
pref_beta: 0.0
learning_rate: 5.0e-7
bf16: true
max_grad_norm: 0
deepspeed: ds_z2.json
cutoff_len: 2048
"""
HEALTHY_LLAMAFACTORY = """\
stage: dpo
finetuning_type: lora
lora_rank: 16
lora_alpha: 32
lora_target: all
use_reentrant_gc: false
learning_rate: 1.0e-4
bf16: true
"""


def codes(findings) -> dict[str, str]:
    return {finding.code: finding.field for finding in findings}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_broken_llamafactory_config_names_every_cause_by_its_key(tmp_path):
    write(tmp_path / "ds_z2.json", json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e9}}))
    setup = read_setup(write(tmp_path / "dpo.yaml", BROKEN_LLAMAFACTORY))
    assert setup.framework == "llamafactory" and setup.lora and setup.reentrant  # use_reentrant_gc defaults to true
    found = lint(setup, hidden_size=1536)
    assert codes(found) == {
        "beta-zero": "pref_beta",
        "lora-scaling": "lora_alpha",
        "lora-targets-conv": "lora_target",
        "lora-targets-vision": "lora_target",
        "learning-rate": "learning_rate",
        "reentrant-checkpointing": "use_reentrant_gc",
        "bf16-no-clipping": "max_grad_norm",
        "deepspeed-buckets": "zero_optimization.reduce_bucket_size",
        "pref-loss-ignored": "pref_loss",
    }
    by_code = {finding.code: finding for finding in found}
    assert "scales the update by 0.125" in by_code["lora-scaling"].message
    assert "(the default)" in by_code["reentrant-checkpointing"].message
    assert "reduce_bucket_size: 2.36e+06" in by_code["deepspeed-buckets"].fix  # 1536**2 rounded to even
    assert "Expected to mark a variable ready only once" in by_code["reentrant-checkpointing"].message
    assert {f.code for f in found if f.severity.value == "error"} == {"beta-zero", "lora-targets-conv"}


def test_llamafactory_trainable_vision_with_full_tuning(tmp_path):
    text = "stage: dpo\nfinetuning_type: full\nfreeze_vision_tower: false\nlearning_rate: 1.0e-6\n"
    found = lint(read_setup(write(tmp_path / "full.yaml", text)))
    assert codes(found) == {"vision-trainable": "freeze"}
    assert "freeze_vision_tower: true" in found[0].fix and "projector" not in found[0].message


def test_a_healthy_llamafactory_config_is_clean_and_exits_0(tmp_path, capsys):
    assert main(["doctor", "--config", str(write(tmp_path / "ok.yaml", HEALTHY_LLAMAFACTORY))]) == 0
    out = capsys.readouterr().out
    assert "(llamafactory, DPO, LoRA)" in out and "no findings" in out


@pytest.mark.parametrize("form", ["shell", "json-list", "json-dict"])
def test_swift_arguments_in_every_form(tmp_path, form):
    arguments = [
        "--rlhf_type",
        "dpo",
        "--model",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "--train_type",
        "full",
        "--freeze_vit",
        "false",
        "--learning_rate",
        "1e-4",
        "--beta",
        "0.1",
    ]
    if form == "shell":
        path = write(tmp_path / "run.sh", "swift rlhf " + " \\\n  ".join(arguments) + "\n")
    elif form == "json-list":
        path = write(tmp_path / "args.json", json.dumps(arguments))
    else:
        pairs = dict(zip(arguments[::2], arguments[1::2]))
        path = write(tmp_path / "args.json", json.dumps({key.lstrip("-"): value for key, value in pairs.items()}))
    setup = read_setup(path)
    assert (setup.framework, setup.dpo, setup.lora, setup.vision_trainable, setup.projector_trainable) == (
        "swift",
        True,
        False,
        True,
        False,
    )
    assert codes(lint(setup)) == {"vision-trainable": "freeze", "learning-rate": "learning_rate"}


def test_swift_lora_defaults_are_fine_and_reentrant_is_judged_only_when_set(tmp_path):
    assert lint(read_setup(write(tmp_path / "a.json", json.dumps({"rlhf_type": "dpo"})))) == []
    kwargs = {"rlhf_type": "dpo", "gradient_checkpointing_kwargs": '{"use_reentrant": true}'}
    found = lint(read_setup(write(tmp_path / "b.json", json.dumps(kwargs))))
    assert codes(found) == {"reentrant-checkpointing": "--gradient_checkpointing_kwargs"}


def test_trl_config_yaml(tmp_path):
    text = "beta: 0.1\nlearning_rate: 5.0e-6\nbf16: true\nmax_grad_norm: 0.0\n"
    found = lint(read_setup(write(tmp_path / "dpo.yaml", text)))
    # Stock trl.DPOTrainer trains every parameter of a full model.
    assert codes(found) == {"vision-trainable": "freeze", "bf16-no-clipping": "max_grad_norm"}
    assert "VLMDPOTrainer" in found[0].fix


def test_the_exit_code_gates_on_errors_only(tmp_path, capsys):
    warning_only = write(tmp_path / "w.yaml", "stage: dpo\nfinetuning_type: lora\nlora_alpha: 1\nlora_rank: 64\n")
    assert main(["doctor", "--config", str(warning_only)]) == 0
    assert "ok: 0 error(s), 2 warning(s)" in capsys.readouterr().out  # LoRA scaling; reentrant by default
    error = write(tmp_path / "e.yaml", "stage: dpo\npref_beta: 0\n")
    assert main(["doctor", "--config", str(error)]) == 1
    assert "FAIL: 1 error(s)" in capsys.readouterr().out


def test_json_output_for_a_config(tmp_path, capsys):
    error = write(tmp_path / "e.yaml", "stage: dpo\npref_beta: 0\n")
    assert main(["doctor", "--config", str(error), "--json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["errors"] == 1 and document["config"]["framework"] == "llamafactory"
    assert document["config"]["findings"][0]["code"] == "beta-zero"


@pytest.mark.parametrize(
    "config_name, text, key",
    [
        ("dpo.yaml", "stage: dpo\nmodel_name_or_path: {adapter}\n", "model_name_or_path"),
        ("args.json", '{{"rlhf_type": "dpo", "model": "{adapter}"}}', "--model"),
    ],
)
def test_an_adapter_folder_given_as_the_model_is_an_error_naming_the_base(tmp_path, config_name, text, key):
    adapter = tmp_path / "checkpoint-100"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct"}))
    found = lint(read_setup(write(tmp_path / config_name, text.format(adapter=adapter))))
    [finding] = [f for f in found if f.code == "adapter-not-applied"]
    assert finding.severity.value == "error" and finding.field == key
    assert "is a LoRA adapter" in finding.message and "Qwen/Qwen2-VL-2B-Instruct" in finding.fix


def test_llamafactory_ignores_an_adapter_without_lora_tuning(tmp_path):
    text = "stage: dpo\nfinetuning_type: full\nadapter_name_or_path: saves/lora\nlearning_rate: 1.0e-6\n"
    assert codes(lint(read_setup(write(tmp_path / "a.yaml", text)))) == {"adapter-not-applied": "adapter_name_or_path"}
