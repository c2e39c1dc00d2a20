"""Freeze policy on real (tiny) LLaVA and Qwen2-VL parameter names."""

from __future__ import annotations

import pytest
import torch

from vlm_dpo_plugins.freeze.apply import apply_trainable, trainable_report
from vlm_dpo_plugins.freeze.classify import group_of, last_blocks
from vlm_dpo_plugins.manager import create_plugin_manager

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from vlm_dpo_plugins.tiny import build_tiny_llava, build_tiny_qwen2_vl

    root = tmp_path_factory.mktemp("models")
    return {
        "llava": transformers.AutoModelForImageTextToText.from_pretrained(build_tiny_llava(root / "llava")),
        "qwen2_vl": transformers.AutoModelForImageTextToText.from_pretrained(build_tiny_qwen2_vl(root / "qwen")),
    }


def configured(config=None):
    manager = create_plugin_manager(load_entry_points=False)
    manager.hook.vlm_dpo_configure(config=manager.load_config(config or {}))
    return manager


@pytest.mark.parametrize(
    "name, group",
    [
        ("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "vision"),
        ("model.multi_modal_projector.linear_1.weight", "projector"),
        ("model.visual.merger.mlp.0.weight", "projector"),  # inside the vision module, still the projector
        ("model.visual.blocks.1.attn.qkv.weight", "vision"),
        ("model.language_model.layers.0.self_attn.q_proj.weight", "language"),
        ("lm_head.weight", "language"),
        ("model.layers.3.mlp.up_proj.weight", "language"),
        ("model.audio_tower.conv1.weight", "other"),
    ],
)
def test_group_of_parameter_names(name, group):
    assert group_of(name) == group


@pytest.mark.parametrize("model_name", ["llava", "qwen2_vl"])
def test_every_parameter_is_classified_and_the_default_trains_only_the_language_model(models, model_name):
    model = models[model_name]
    manager = configured()
    groups = manager.hook.vlm_dpo_classify_parameters(model=model, model_type=model.config.model_type)
    names = {name for name, _ in model.named_parameters()}
    assert set().union(*groups.values()) == names
    assert groups["other"] == []
    assert groups["vision"] and groups["projector"] and groups["language"]

    trainable = manager.hook.vlm_dpo_trainable_parameters(groups=groups, step=0)
    assert trainable == set(groups["language"])
    apply_trainable(model, trainable)
    report = trainable_report(groups, model)
    assert report["vision"]["trainable"] == 0 and report["projector"]["trainable"] == 0
    assert report["language"]["trainable"] == report["language"]["parameters"] > 0


def test_progressive_unfreezing_adds_projector_then_last_vision_block(models):
    model = models["qwen2_vl"]
    manager = configured({"freeze": {"unfreeze": [{"at_step": 5, "groups": ["projector"]}, {"at_step": 9, "vision_blocks": 1}]}})
    groups = manager.hook.vlm_dpo_classify_parameters(model=model, model_type="qwen2_vl")
    at = lambda step: manager.hook.vlm_dpo_trainable_parameters(groups=groups, step=step)  # noqa: E731
    assert at(4) == set(groups["language"])
    assert at(5) == set(groups["language"]) | set(groups["projector"])
    last_block = {name for name in groups["vision"] if ".blocks.1." in name}
    assert last_block and at(9) == at(5) | last_block

    apply_trainable(model, at(4))
    assert apply_trainable(model, at(5)) == set(groups["projector"])


def test_last_blocks_picks_the_highest_indices():
    names = [f"visual.blocks.{i}.attn.weight" for i in range(12)] + ["visual.patch_embed.proj.weight"]
    assert last_blocks(names, 2) == {"visual.blocks.10.attn.weight", "visual.blocks.11.attn.weight"}
    assert last_blocks(names, 0) == set()


def test_optimizer_groups_carry_per_group_learning_rates(models):
    model = models["llava"]
    manager = configured({"freeze": {"trainable": ["language", "projector"], "learning_rates": {"projector": 2e-5}}})
    groups = manager.hook.vlm_dpo_classify_parameters(model=model, model_type="llava")
    trainable = manager.hook.vlm_dpo_trainable_parameters(groups=groups, step=0)
    optimizer_groups = manager.hook.vlm_dpo_optimizer_groups(groups=groups, trainable=trainable, base_learning_rate=1e-4)
    by_group = {g["group"]: g for g in optimizer_groups}
    assert set(by_group) == {"language", "projector"}
    assert by_group["projector"]["lr"] == 2e-5 and by_group["language"]["lr"] == 1e-4
    assert set(by_group["projector"]["names"]) == set(groups["projector"])


def test_lora_targets_skip_frozen_groups_and_the_lm_head(models):
    model = models["llava"]
    manager = configured()
    groups = manager.hook.vlm_dpo_classify_parameters(model=model, model_type="llava")
    targets = manager.hook.vlm_dpo_lora_target_modules(model=model, groups=groups)
    assert targets and all(t.startswith("model.language_model.") for t in targets)
    assert all(isinstance(model.get_submodule(t), torch.nn.Linear) for t in targets)
    everything = configured({"freeze": {"lora_skip_frozen": False}})
    assert any("vision_tower" in t for t in everything.hook.vlm_dpo_lora_target_modules(model=model, groups=groups))
