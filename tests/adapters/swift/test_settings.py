"""Swift's flags and the plugin config as one set of settings, parsed by swift's own argument parser.

Each case parses a real ``swift rlhf`` command line into ms-swift 4.6.0's ``RLHFArguments``
(the tiny Qwen2-VL on disk, nothing trained), reconciles it with a plugin config, and checks
the result: the config the plugins run with, swift's arguments as its trainer will read them,
or the exact error a user sees.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

swift = pytest.importorskip("swift", reason="needs the ms-swift test environment (ms-swift==4.6.0)")
if getattr(swift, "__file__", None) is None:  # a namespace package (e.g. a stray ``swift/`` folder), not ms-swift
    pytest.skip("`swift` is not ms-swift here", allow_module_level=True)

import torch  # noqa: E402
from vlm_dpo_plugins.adapters.hf_trainer.run import command_line_keys  # noqa: E402
from vlm_dpo_plugins.adapters.swift.settings import reconcile  # noqa: E402

from vlm_dpo_plugins.config_source import load_plugin_config  # noqa: E402
from vlm_dpo_plugins.errors import ConfigError  # noqa: E402
from vlm_dpo_plugins.manager import create_plugin_manager  # noqa: E402

DOCS = Path(__file__).resolve().parents[3] / "docs" / "swift.md"


@pytest.fixture(scope="module")
def base_command(tmp_path_factory, swift_tiny_models, swift_dataset_writer) -> list[str]:
    root = tmp_path_factory.mktemp("swift_settings")
    model_dir = swift_tiny_models["qwen2_vl"].build(root / "model")
    dataset = swift_dataset_writer(root / "data" / "train.jsonl", 2)
    return [
        "--rlhf_type", "dpo",
        "--model", str(model_dir),
        "--model_type", "qwen2_vl",
        "--template", "qwen2_vl",
        "--check_model", "false",
        "--dataset", str(dataset),
        "--output_dir", str(root / "out"),
        "--add_version", "false",
        "--report_to", "none",
    ]  # fmt: skip


def settle(base_command: list[str], *flags: str, config: dict | None = None):
    """Parse ``swift rlhf`` with ``flags`` and reconcile it with ``config``: (settings, args)."""
    from swift.arguments import RLHFArguments
    from swift.utils import parse_args

    argv = [*base_command, *flags]
    args, remaining = parse_args(RLHFArguments, argv)
    assert not remaining, remaining
    plugin_config, written = load_plugin_config(create_plugin_manager(), config)
    return reconcile(args, plugin_config, written, command_line_keys(argv)), args


def test_written_arguments_reads_both_spellings() -> None:
    argv = ["--freeze-vit=false", "--vit_lr", "1e-5", "value", "-x", "--"]
    assert command_line_keys(argv) == {"freeze_vit", "vit_lr"}


def test_defaults_keep_swifts_loss_and_freeze_and_move_clipping_into_the_guards(base_command) -> None:
    settings, args = settle(base_command, "--tuner_type", "lora")
    assert settings.framework_computes_loss
    assert settings.config.freeze.trainable == ("language",)
    assert (args.freeze_vit, args.freeze_aligner, args.freeze_llm) == (True, True, False)
    assert settings.config.guards.max_grad_norm == 1.0 and args.training_args.max_grad_norm == 0.0
    assert settings.config.loss.beta == 0.1 and args.training_args.beta == 0.1


def test_swift_freeze_and_learning_rate_flags_become_the_policy(base_command) -> None:
    flags = ("--freeze_vit", "false", "--freeze_aligner", "false", "--vit_lr", "1e-5", "--aligner_lr", "2e-5")
    settings, _ = settle(base_command, *flags)
    assert set(settings.config.freeze.trainable) == {"vision", "projector", "language"}
    assert settings.config.freeze.learning_rates == {"vision": 1e-5, "projector": 2e-5}
    # --aligner_lr for a projector that never trains is refused rather than ignored
    with pytest.raises(ConfigError, match="--vit_lr and swift's --aligner_lr with the freeze policy are invalid"):
        settle(base_command, "--aligner_lr", "2e-5")


def test_an_unfreeze_stage_makes_swift_target_the_group(base_command) -> None:
    config = {"freeze": {"unfreeze": [{"at_step": 10, "groups": ["vision", "projector"]}]}}
    settings, args = settle(base_command, "--tuner_type", "lora", config=config)
    assert settings.config.freeze.trainable == ("language",)  # from swift's defaults, trained from step 0
    # LoRA targets are computed from these flags in prepare_model: the vision adapters exist for the stage
    assert (args.freeze_vit, args.freeze_aligner, args.freeze_llm) == (False, False, False)


def test_the_registry_loss_replaces_swifts(base_command) -> None:
    settings, args = settle(base_command, config={"loss": {"type": "mdpo", "beta": 0.2}})
    assert not settings.framework_computes_loss
    assert (settings.config.loss.type, settings.config.loss.beta) == ("mdpo", 0.2)
    assert args.training_args.beta == 0.2


def test_reentrant_checkpointing_written_on_the_command_line_is_kept(base_command) -> None:
    settings, _ = settle(base_command, "--gradient_checkpointing_kwargs", '{"use_reentrant": true}')
    assert settings.config.guards.non_reentrant_checkpointing is False
    settings, _ = settle(base_command)
    assert settings.config.guards.non_reentrant_checkpointing is True


@pytest.mark.parametrize(
    ("flags", "config", "message"),
    [
        (
            ("--beta", "0.2"),
            {"loss": {"beta": 0.3}},
            "swift's --beta is 0.2 and the plugin config's loss.beta is 0.3: set it in one place",
        ),
        (
            ("--loss_type", "hinge"),
            {"loss": {"type": "mdpo"}},
            "swift's --loss_type is 'hinge' and the plugin config's loss.type is 'mdpo': set the loss in one place",
        ),
        (
            ("--rpo_alpha", "0.5"),
            {"loss": {"type": "hinge"}},
            "swift's --rpo_alpha only applies to its own loss, but the plugin config's loss.type 'hinge' replaces that",
        ),
        (
            ("--freeze_vit", "false"),
            {"freeze": {"trainable": ["language"]}},
            "swift's --freeze_vit is False and the plugin config's freeze.trainable is ['language']: say whether "
            "the vision group trains in one place",
        ),
        (
            ("--freeze_vit", "false", "--vit_lr", "1e-5"),
            {"freeze": {"trainable": ["vision", "language"], "learning_rates": {"vision": 2e-5}}},
            "swift's --vit_lr is 1e-05 and the plugin config's freeze.learning_rates.vision is 2e-05",
        ),
        (
            ("--gradient_checkpointing_kwargs", '{"use_reentrant": true}'),
            {"guards": {"non_reentrant_checkpointing": True}},
            "swift's --gradient_checkpointing_kwargs use_reentrant is True and the plugin config's "
            "guards.non_reentrant_checkpointing is True: set it in one place",
        ),
        (
            ("--max_grad_norm", "0.5"),
            {"guards": {"max_grad_norm": 2.0}},
            "swift's --max_grad_norm is 0.5 and the plugin config's guards.max_grad_norm is 2.0",
        ),
    ],
    ids=["beta", "loss_type", "rpo_alpha", "freeze_vit", "vit_lr", "reentrant", "max_grad_norm"],
)
def test_a_setting_written_differently_in_both_places_is_an_error(base_command, flags, config, message) -> None:
    with pytest.raises(ConfigError) as raised:
        settle(base_command, *flags, config=config)
    assert message in str(raised.value)


def test_the_plugin_file_activates_once(tmp_path) -> None:
    import runpy

    from swift.pipelines.train.rlhf import SwiftRLHF
    from swift.trainers import TrainerFactory
    from vlm_dpo_plugins.adapters.swift import plugin_path
    from vlm_dpo_plugins.adapters.swift.activation import STOCK_TRAINER_PATH, TRAINER_PATH

    stock_prepare = SwiftRLHF.__dict__["prepare_model"]
    try:
        runpy.run_path(str(plugin_path()), run_name="_first_copy")
        wrapped = SwiftRLHF.__dict__["prepare_model"]
        runpy.run_path(str(plugin_path()), run_name="_second_copy")
        assert TrainerFactory.TRAINER_MAPPING["dpo"] == TRAINER_PATH
        assert SwiftRLHF.__dict__["prepare_model"] is wrapped, "the second load wrapped prepare_model again"
    finally:
        TrainerFactory.TRAINER_MAPPING["dpo"] = STOCK_TRAINER_PATH
        SwiftRLHF.prepare_model = stock_prepare


def test_swifts_loss_reads_fp32_log_probs_of_low_precision_logits() -> None:
    from types import SimpleNamespace

    from vlm_dpo_plugins.adapters.swift.trainer import PluginDPOTrainer

    from vlm_dpo_plugins.manager import create_plugin_manager

    trainer = object.__new__(PluginDPOTrainer)
    trainer.template = SimpleNamespace(sequence_parallel_size=1)
    trainer.vlm_dpo_config = create_plugin_manager(load_entry_points=False).default_config()
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 50, generator=generator) * 8).to(torch.bfloat16)
    labels = torch.randint(0, 50, (3, 7), generator=generator)
    labels[:, :3] = -100
    per_token, mean_logits, mask = trainer.get_per_token_logps(logits, labels)
    assert per_token.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(per_token, expected * mask, rtol=0, atol=1e-5)
    bf16_result = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert not torch.allclose(per_token, bf16_result.float() * mask, atol=1e-5), "bf16 would have been as exact"


def test_every_yaml_example_in_the_docs_is_a_valid_plugin_config() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert blocks, f"no yaml example in {DOCS}"
    import yaml

    for block in blocks:
        load_plugin_config(create_plugin_manager(), yaml.safe_load(block))
