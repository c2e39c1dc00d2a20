"""The ``vlm_dpo:`` section and LLaMA-Factory's own keys, parsed by LLaMA-Factory's real parser, reconciled.

No training here: ``get_train_args`` (LLaMA-Factory 0.9.5's parser, with the adapter's wrapper around
``_parse_args``) turns a config dict into its argument dataclasses, and ``prepare_run`` reconciles them
with the plugin config exactly as the DPO workflow does before ``load_model``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")

import llamafactory.train.dpo as dpo_package  # noqa: E402
from llamafactory.hparams import get_train_args  # noqa: E402
from vlm_dpo_plugins.adapters.hf_trainer.run import CONFIG_VARIABLE as CONFIG_PATH_VARIABLE  # noqa: E402
from vlm_dpo_plugins.adapters.llamafactory.activation import activate  # noqa: E402
from vlm_dpo_plugins.adapters.llamafactory.config_section import SECTION  # noqa: E402
from vlm_dpo_plugins.adapters.llamafactory.workflow import PluginRun, prepare_run  # noqa: E402

from vlm_dpo_plugins.errors import ConfigError  # noqa: E402


@pytest.fixture(autouse=True)
def adapter_active(monkeypatch):
    monkeypatch.delenv(CONFIG_PATH_VARIABLE, raising=False)
    assert activate(dpo_package)


def parsed_arguments(tmp_path: Path, stage: str = "dpo", **config):
    """LLaMA-Factory's own parse of a LoRA config of ``stage`` plus ``config``, through the adapter's wrapper."""
    args = {
        "model_name_or_path": str(tmp_path / "model"),
        "stage": stage,
        "do_train": True,
        "finetuning_type": "lora",
        "dataset": "pref",
        "dataset_dir": str(tmp_path),
        "template": "llava",
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        **config,
    }
    return get_train_args(args)


def parse(tmp_path: Path, **config):
    """LLaMA-Factory's parsed arguments and the reconciled plugin run for a LoRA DPO config plus ``config``."""
    model_args, _, training_args, finetuning_args, _ = parsed_arguments(tmp_path, **config)
    run = prepare_run(SECTION.latest, model_args, training_args, finetuning_args)
    return run, model_args, training_args, finetuning_args


def test_section_reaches_the_plugins_not_llamafactorys_parser(tmp_path):
    # Unknown keys make LLaMA-Factory's parser raise; the section must have been taken out before it.
    run, *_ = parse(tmp_path, vlm_dpo={"loss": {"beta": 0.25}, "guards": {"spike_factor": 5.0}})
    assert isinstance(run, PluginRun)
    assert run.config.loss.beta == 0.25
    assert run.config.guards.spike_factor == 5.0
    assert run.origin == "'vlm_dpo:' section"


def test_without_a_section_llamafactorys_keys_decide(tmp_path):
    run, model_args, training_args, finetuning_args = parse(tmp_path, pref_loss="hinge", pref_beta=0.3)
    assert (run.config.loss.type, run.config.loss.beta) == ("hinge", 0.3)
    assert not run.framework_computes_loss
    # LLaMA-Factory's default flags freeze vision tower and projector.
    assert run.config.freeze.trainable == ("language",)
    assert run.origin == "defaults, with LLaMA-Factory's pref_loss, pref_beta"
    # The guards clip (per group) and checkpointing goes non-reentrant, written where load_model/Trainer read it.
    assert training_args.max_grad_norm == 0.0
    assert run.config.guards.max_grad_norm == 1.0
    assert model_args.use_reentrant_gc is False


def test_freeze_flags_map_onto_the_policy(tmp_path):
    run, *_ = parse(tmp_path, freeze_vision_tower=False, freeze_multi_modal_projector=False)
    assert set(run.config.freeze.trainable) == {"vision", "projector", "language"}


def test_policy_unfreeze_stages_become_trainable_in_llamafactorys_flags(tmp_path):
    # LoRA targets and requires_grad come from these flags: a group trained later must be covered from the start.
    section = {"freeze": {"trainable": ["language"], "unfreeze": [{"at_step": 5, "groups": ["projector"]}]}}
    run, _, _, finetuning_args = parse(tmp_path, vlm_dpo=section)
    assert run.config.freeze.trainable == ("language",)
    assert finetuning_args.freeze_multi_modal_projector is False
    assert finetuning_args.freeze_vision_tower is True
    assert finetuning_args.freeze_language_model is False


def test_freeze_written_twice_differently_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as error:
        parse(tmp_path, freeze_multi_modal_projector=True, vlm_dpo={"freeze": {"trainable": ["language", "projector"]}})
    assert str(error.value) == (
        "LLaMA-Factory's freeze_multi_modal_projector is True and vlm_dpo.freeze.trainable is "
        "['language', 'projector']: say whether the projector group trains in one place"
    )


def test_loss_written_twice_differently_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as error:
        parse(tmp_path, pref_loss="sigmoid", vlm_dpo={"loss": {"type": "mdpo"}})
    assert str(error.value) == (
        "LLaMA-Factory's pref_loss is 'sigmoid' and vlm_dpo.loss.type is 'mdpo': set the loss in one place "
        "(vlm_dpo.loss.type covers every built-in variant, mDPO and MPO included)"
    )


def test_beta_written_twice_differently_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="LLaMA-Factory's pref_beta is 0.2 and vlm_dpo.loss.beta is 0.3"):
        parse(tmp_path, pref_beta=0.2, vlm_dpo={"loss": {"beta": 0.3}})


def test_plugin_only_variant_keeps_a_reference(tmp_path):
    run, _, _, finetuning_args = parse(tmp_path, vlm_dpo={"loss": {"type": "mdpo", "beta": 0.2}})
    assert run.config.loss.type == "mdpo"
    assert finetuning_args.use_ref_model is True
    assert finetuning_args.pref_beta == 0.2


def test_reference_free_variant_drops_the_reference(tmp_path):
    run, _, _, finetuning_args = parse(tmp_path, vlm_dpo={"loss": {"type": "simpo"}})
    assert (finetuning_args.pref_loss, finetuning_args.use_ref_model) == ("simpo", False)


def test_llamafactory_only_loss_stays_llamafactorys(tmp_path):
    run, *_ = parse(tmp_path, pref_loss="orpo")
    assert run.framework_computes_loss
    with pytest.raises(ConfigError, match="pref_bco_weight=0.5 only applies to its own loss"):
        parse(tmp_path, pref_bco_weight=0.5, vlm_dpo={"loss": {"type": "ipo"}})


def test_reentrant_checkpointing_the_user_wrote_is_kept(tmp_path):
    run, model_args, training_args, _ = parse(tmp_path, use_reentrant_gc=True)
    assert model_args.use_reentrant_gc is True
    assert run.config.guards.non_reentrant_checkpointing is False
    with pytest.raises(ConfigError, match="use_reentrant_gc is True and vlm_dpo.guards.non_reentrant_checkpointing"):
        parse(tmp_path, use_reentrant_gc=True, vlm_dpo={"guards": {"non_reentrant_checkpointing": True}})


def test_max_grad_norm_written_in_llamafactory_goes_to_the_guards(tmp_path):
    run, _, training_args, _ = parse(tmp_path, max_grad_norm=0.5)
    assert run.config.guards.max_grad_norm == 0.5
    assert training_args.max_grad_norm == 0.0


def test_config_path_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "plugins.yaml"
    path.write_text("loss:\n  type: robust\n  label_smoothing: 0.1\n")
    monkeypatch.setenv(CONFIG_PATH_VARIABLE, str(path))
    run, *_ = parse(tmp_path)
    assert (run.config.loss.type, run.config.loss.label_smoothing) == ("robust", 0.1)
    assert run.origin == f"{CONFIG_PATH_VARIABLE}={path}"
    with pytest.raises(ConfigError, match=f"given twice \\('vlm_dpo:' section, and {CONFIG_PATH_VARIABLE}="):
        parse(tmp_path, vlm_dpo={"loss": {"beta": 0.2}})


def test_section_may_be_a_yaml_path(tmp_path):
    path = tmp_path / "plugins.yaml"
    path.write_text("loss:\n  type: ipo\n")
    run, *_ = parse(tmp_path, vlm_dpo=str(path))
    assert run.config.loss.type == "ipo"


def test_invalid_plugin_setting_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="loss.beta"):
        parse(tmp_path, vlm_dpo={"loss": {"beta": 0}})


def docs_examples() -> list[dict]:
    import re

    import yaml

    text = (Path(__file__).parents[3] / "docs" / "llamafactory.md").read_text()
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]
    return [block for block in blocks if isinstance(block, dict) and block.get("stage") == "dpo"]


def test_docs_examples_parse_and_reconcile(tmp_path):
    examples = docs_examples()
    assert len(examples) == 2, "docs/llamafactory.md should show the Qwen2-VL LoRA and the LLaVA full example"
    for example in examples:
        # Only what cannot exist here is replaced: the hub model, the DeepSpeed file, the output folder.
        example = {key: value for key, value in example.items() if key != "deepspeed"}
        example.update(model_name_or_path=str(tmp_path / "model"), output_dir=str(tmp_path / "out"), use_cpu=True)
        example.update(bf16=False)
        model_args, _, training_args, finetuning_args, _ = get_train_args(example)
        run = prepare_run(SECTION.latest, model_args, training_args, finetuning_args)
        section = example["vlm_dpo"]
        if "loss" in section and "type" in section["loss"]:
            assert run.config.loss.type == section["loss"]["type"]
        else:
            assert run.config.loss.type == example["pref_loss"]
        assert run.config.freeze.trainable == ("language",)


def test_a_section_in_another_stages_config_is_checked_then_said_to_be_ignored(tmp_path, caplog):
    # Stock LLaMA-Factory rejects the unknown key; with the adapter the key is taken out, so it must not vanish.
    package_logger = logging.getLogger("vlm_dpo_plugins")  # the adapter's console handler does not propagate
    package_logger.addHandler(caplog.handler)
    try:
        _, _, training_args, finetuning_args, _ = parsed_arguments(tmp_path, "sft", vlm_dpo={"loss": {"beta": 0.25}})
    finally:
        package_logger.removeHandler(caplog.handler)
    assert finetuning_args.stage == "sft" and training_args.do_train
    assert (
        "vlm-dpo: the 'vlm_dpo:' section applies to stage: dpo only; this run is stage: sft, so it was checked and "
        "is ignored"
    ) in caplog.messages
    with pytest.raises(ConfigError, match="loss.beta"):
        parsed_arguments(tmp_path, "sft", vlm_dpo={"loss": {"beta": -1}})
    with pytest.raises(ConfigError, match="unknown"):
        parsed_arguments(tmp_path, "sft", vlm_dpo={"loss": {"betta": 0.2}})


def test_a_section_that_is_neither_mapping_nor_path_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'vlm_dpo:' section is 3: expected a mapping of plugin settings"):
        parse(tmp_path, vlm_dpo=3)


def test_a_key_written_with_dashes_on_the_command_line_counts_as_written(tmp_path, monkeypatch):
    # HfArgumentParser takes --pref-beta for pref_beta: the user wrote it, so a different plugin beta conflicts.
    path = tmp_path / "plugins.yaml"
    path.write_text("loss:\n  beta: 0.2\n")
    monkeypatch.setenv(CONFIG_PATH_VARIABLE, str(path))
    config = {
        "model_name_or_path": tmp_path / "model",
        "stage": "dpo",
        "do_train": True,
        "finetuning_type": "lora",
        "dataset": "pref",
        "dataset_dir": tmp_path,
        "template": "llava",
        "output_dir": tmp_path / "out",
        "use_cpu": True,
    }
    argv = [f"--{key}={value}" for key, value in config.items()] + ["--pref-beta", "0.3"]
    model_args, _, training_args, finetuning_args, _ = get_train_args(argv)
    assert finetuning_args.pref_beta == 0.3
    with pytest.raises(ConfigError, match="pref_beta is 0.3 and vlm_dpo.loss.beta is 0.2"):
        prepare_run(SECTION.latest, model_args, training_args, finetuning_args)
