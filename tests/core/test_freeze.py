"""Freeze policy on real (tiny) LLaVA and Qwen2-VL parameter names: classification, plan, LoRA targets, report."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tiny_vlms import load_tiny_models

from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.freeze.apply import apply_trainable
from vlm_dpo_plugins.freeze.classify import classify_names, group_of, last_blocks, vision_blocks
from vlm_dpo_plugins.freeze.report import trainable_report
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import RunContext

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return load_tiny_models(tmp_path_factory.mktemp("models"))


def configured(config=None):
    manager = create_plugin_manager(load_entry_points=False)
    manager.hook.vlm_dpo_configure(config=manager.load_config(config or {}))
    return manager


def numel(model, names):
    parameters = dict(model.named_parameters())
    return sum(parameters[name].numel() for name in names)


# -- classification -----------------------------------------------------------------------------


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
def test_generic_markers_sort_names_of_unknown_model_types(name, group):
    assert group_of(name) == group


@pytest.mark.parametrize(
    "model_type, name, group",
    [
        # Qwen3-VL's deepstack mergers feed the language model: projector, though the generic
        # markers (no "merger" component) would call them vision.
        ("qwen3_vl", "model.visual.deepstack_merger_list.0.linear_fc1.weight", "projector"),
        ("qwen3_vl", "model.visual.blocks.0.attn.qkv.weight", "vision"),
        # transformers 4.x layouts: no "model." prefix, the decoder as a bare "model"
        ("qwen2_vl", "visual.merger.mlp.0.weight", "projector"),
        ("qwen2_vl", "model.layers.0.mlp.up_proj.weight", "language"),
        ("llava", "language_model.model.layers.0.self_attn.q_proj.weight", "language"),
        # PEFT-wrapped names
        ("qwen2_vl", "base_model.model.model.visual.merger.mlp.0.lora_A.default.weight", "projector"),
        ("llava", "base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight", "language"),
        ("llava_next", "model.image_newline", "projector"),
        ("mllama", "model.language_model.layers.3.cross_attn.q_proj.weight", "language"),
        ("mllama", "model.vision_model.global_transformer.layers.7.mlp.fc1.weight", "vision"),
        ("idefics3", "model.connector.modality_projection.proj.weight", "projector"),
        ("qwen2_5_omni_thinker", "model.audio_tower.layers.0.fc1.weight", "other"),
    ],
)
def test_registry_rows_sort_names_of_known_model_types(model_type, name, group):
    assert group_of(name, model_type) == group


def test_generic_markers_alone_would_misfile_the_deepstack_mergers():
    assert group_of("model.visual.deepstack_merger_list.0.linear_fc1.weight") == "vision"


def test_a_name_nothing_recognises_is_reported_and_put_in_other():
    result = classify_names(["model.visual.blocks.0.attn.qkv.weight", "mystery_head.weight"], "qwen2_vl")
    assert result.unmatched == ("mystery_head.weight",)
    assert result.groups["other"] == ["mystery_head.weight"]


def test_classify_hook_warns_about_unmatched_parameters(caplog):
    model = torch.nn.ModuleDict({"language_model": torch.nn.Linear(2, 2), "mystery_head": torch.nn.Linear(2, 2)})
    manager = configured()
    with caplog.at_level(logging.WARNING, logger="vlm_dpo_plugins.freeze"):
        groups = manager.hook.vlm_dpo_classify_parameters(model=model, model_type="llava")
        manager.hook.vlm_dpo_classify_parameters(model=model, model_type="llava")
    assert groups["other"] == ["mystery_head.weight", "mystery_head.bias"]
    assert len(caplog.records) == 1
    assert "2 parameter(s) of model type 'llava'" in caplog.text and "mystery_head.weight" in caplog.text


@pytest.mark.parametrize("model_name", ["llava", "qwen2_vl"])
def test_every_parameter_is_classified_and_the_default_trains_only_the_language_model(models, model_name):
    model = copy.deepcopy(models[model_name])
    manager = configured()
    groups = manager.hook.vlm_dpo_classify_parameters(model=model, model_type=model.config.model_type)
    names = [name for name, _ in model.named_parameters()]
    assert sorted(name for members in groups.values() for name in members) == sorted(names)
    assert groups["other"] == []
    assert groups["vision"] and groups["projector"] and groups["language"]

    trainable = manager.hook.vlm_dpo_trainable_parameters(groups=groups, step=0)
    assert trainable == set(groups["language"])
    apply_trainable(model, trainable)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(groups["language"])
    report = trainable_report(groups, model)
    assert report["vision"]["trainable"] == 0 and report["projector"]["trainable"] == 0
    assert report["language"]["trainable"] == report["language"]["parameters"] == numel(model, groups["language"])
    total = numel(model, names)
    assert report["language"]["trainable_share"] == pytest.approx(numel(model, groups["language"]) / total)


# -- progressive schedule --------------------------------------------------------------------------


def test_progressive_unfreezing_adds_projector_then_last_vision_block(models):
    model = copy.deepcopy(models["qwen2_vl"])
    manager = configured(
        {"freeze": {"unfreeze": [{"at_step": 5, "groups": ["projector"]}, {"at_step": 9, "vision_blocks": 1}]}}
    )
    groups = manager.hook.vlm_dpo_classify_parameters(model=model, model_type="qwen2_vl")

    def at(step):
        return manager.hook.vlm_dpo_trainable_parameters(groups=groups, step=step)

    assert at(4) == set(groups["language"])
    assert at(5) == set(groups["language"]) | set(groups["projector"])
    last_block = {name for name in groups["vision"] if name.startswith("model.visual.blocks.1.")}
    assert last_block and at(9) == at(5) | last_block

    apply_trainable(model, at(4))
    assert apply_trainable(model, at(5)) == set(groups["projector"])
    assert apply_trainable(model, at(9)) == last_block


def test_last_llava_vision_block_is_the_top_encoder_layer(models):
    model = models["llava"]
    groups = configured().hook.vlm_dpo_classify_parameters(model=model, model_type="llava")
    top = {name for name in groups["vision"] if ".encoder.layers.1." in name}
    assert top and last_blocks(groups["vision"], 1, "llava") == top
    assert last_blocks(groups["vision"], 2, "llava") == {n for n in groups["vision"] if ".encoder.layers." in n}


def test_last_blocks_picks_the_highest_indices():
    names = [f"visual.blocks.{i}.attn.weight" for i in range(12)] + ["visual.patch_embed.proj.weight"]
    assert last_blocks(names, 2) == {"visual.blocks.10.attn.weight", "visual.blocks.11.attn.weight"}
    assert last_blocks(names, 0) == set()


@pytest.mark.parametrize(
    "stack",
    [
        "model.visual.blocks",  # Qwen2-VL
        "model.vision_tower.vision_model.encoder.layers",  # LLaVA with a CLIPVisionModel tower
        "base_model.model.model.vision_tower.encoder.layers",  # LLaVA in transformers 5, PEFT-wrapped
    ],
)
def test_last_blocks_follow_each_layout(stack):
    names = [f"{stack}.{i}.{leaf}" for i in range(4) for leaf in ("mlp.fc1.weight", "norm1.bias")]
    names.append(stack.rsplit(".", 2)[0] + ".post_layernorm.weight")
    assert last_blocks(names, 1, "qwen2_vl") == {f"{stack}.3.mlp.fc1.weight", f"{stack}.3.norm1.bias"}
    assert len(last_blocks(names, 3)) == 6


def test_blocks_of_later_stacks_come_last():
    # Mllama runs its global transformer after the local one, so its blocks are the last ones.
    local = [f"vision_model.transformer.layers.{i}.mlp.weight" for i in range(32)]
    global_ = [f"vision_model.global_transformer.layers.{i}.mlp.weight" for i in range(8)]
    assert last_blocks(local + global_, 2) == set(global_[-2:])
    assert last_blocks(local + global_, 9) == set(global_) | {local[-1]}


def test_a_registry_row_can_name_the_vision_stack():
    encoder = [f"model.vision_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(3)]
    vq_decoder = [f"model.vqmodel.decoder.up.{i}.block.0.conv1.weight" for i in range(2)]
    assert last_blocks(encoder + vq_decoder, 1) == {vq_decoder[-1]}  # found by name alone
    assert last_blocks(encoder + vq_decoder, 1, "janus") == {encoder[-1]}
    assert len(vision_blocks(encoder + vq_decoder, "janus")) == 3


# -- optimizer groups and LoRA targets ----------------------------------------------------------------


def test_optimizer_groups_carry_per_group_learning_rates(models):
    model = models["llava"]
    manager = configured({"freeze": {"trainable": ["language", "projector"], "learning_rates": {"projector": 2e-5}}})
    groups = manager.hook.vlm_dpo_classify_parameters(model=model, model_type="llava")
    trainable = manager.hook.vlm_dpo_trainable_parameters(groups=groups, step=0)
    optimizer_groups = manager.hook.vlm_dpo_optimizer_groups(
        groups=groups, trainable=trainable, base_learning_rate=1e-4
    )
    by_group = {g["group"]: g for g in optimizer_groups}
    assert set(by_group) == {"language", "projector"}
    assert by_group["projector"]["lr"] == 2e-5 and by_group["language"]["lr"] == 1e-4
    assert set(by_group["projector"]["names"]) == set(groups["projector"])


def test_groups_unfrozen_later_are_listed_empty_from_the_start(models):
    model = models["qwen2_vl"]
    manager = configured(
        {
            "freeze": {
                "learning_rates": {"projector": 2e-5, "vision": 1e-6},
                "unfreeze": [{"at_step": 5, "groups": ["projector"]}, {"at_step": 9, "vision_blocks": 1}],
            }
        }
    )
    groups = manager.hook.vlm_dpo_classify_parameters(model=model, model_type="qwen2_vl")
    trainable = manager.hook.vlm_dpo_trainable_parameters(groups=groups, step=0)
    optimizer_groups = manager.hook.vlm_dpo_optimizer_groups(
        groups=groups, trainable=trainable, base_learning_rate=1e-4
    )
    assert [(g["group"], len(g["names"]), g["lr"]) for g in optimizer_groups] == [
        ("vision", 0, 1e-6),
        ("projector", 0, 2e-5),
        ("language", len(groups["language"]), 1e-4),
    ]


def test_lora_targets_skip_frozen_groups_and_the_lm_head(models):
    model = models["llava"]
    manager = configured()
    groups = manager.hook.vlm_dpo_classify_parameters(model=model, model_type="llava")
    targets = manager.hook.vlm_dpo_lora_target_modules(model=model, groups=groups)
    expected = sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("model.language_model.layers.")
    )
    assert targets == expected  # every decoder projection, nothing else: no lm_head, no vision q_proj
    everything = configured({"freeze": {"lora_skip_frozen": False}})
    all_targets = everything.hook.vlm_dpo_lora_target_modules(model=model, groups=groups)
    assert any("vision_tower" in t for t in all_targets) and any("multi_modal_projector" in t for t in all_targets)
    assert "lm_head" not in all_targets


def test_lora_targets_never_include_the_conv_patch_embedding(models):
    model = models["qwen2_vl"]
    groups = configured().hook.vlm_dpo_classify_parameters(model=model, model_type="qwen2_vl")
    everything = configured({"freeze": {"lora_skip_frozen": False, "trainable": ["vision", "projector", "language"]}})
    targets = everything.hook.vlm_dpo_lora_target_modules(model=model, groups=groups)
    assert isinstance(model.get_submodule("model.visual.patch_embed.proj"), torch.nn.Conv3d)
    assert "model.visual.patch_embed.proj" not in targets
    assert "model.visual.blocks.0.attn.qkv" in targets and "model.visual.merger.mlp.0" in targets


def test_peft_wraps_exactly_the_returned_targets_and_only_adapters_train(models):
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(models["llava"])
    manager = configured({"freeze": {"unfreeze": [{"at_step": 3, "groups": ["projector"]}]}})
    groups = manager.hook.vlm_dpo_classify_parameters(model=model, model_type="llava")
    targets = manager.hook.vlm_dpo_lora_target_modules(model=model, groups=groups)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))

    wrapped_groups = manager.hook.vlm_dpo_classify_parameters(model=wrapped, model_type="llava")
    adapters = {name for name, _ in wrapped.named_parameters() if ".lora_" in name}
    assert adapters and adapters <= set(wrapped_groups["language"])
    assert {name.split(".lora_")[0].removeprefix("base_model.model.") for name in adapters} == set(targets)

    # The language model trains through its adapters only; norms, embeddings and base weights stay frozen.
    apply_trainable(wrapped, manager.hook.vlm_dpo_trainable_parameters(groups=wrapped_groups, step=0), wrapped_groups)
    assert {name for name, p in wrapped.named_parameters() if p.requires_grad} == adapters
    # The projector has no adapters, so unfreezing it trains it in full.
    newly = apply_trainable(
        wrapped, manager.hook.vlm_dpo_trainable_parameters(groups=wrapped_groups, step=3), wrapped_groups
    )
    assert newly == set(wrapped_groups["projector"])


# -- report and run-time checks --------------------------------------------------------------------


def test_trainable_report_is_logged_once_with_counts_per_group(models, caplog):
    model = copy.deepcopy(models["llava"])
    manager = configured()
    groups = manager.hook.vlm_dpo_classify_parameters(model=model, model_type="llava")
    apply_trainable(model, manager.hook.vlm_dpo_trainable_parameters(groups=groups, step=0))
    context = RunContext(framework="test", model_type="llava")
    with caplog.at_level(logging.INFO, logger="vlm_dpo_plugins.freeze"):
        manager.hook.vlm_dpo_train_begin(model=model, context=context)
        manager.hook.vlm_dpo_train_begin(model=model, context=context)
    records = [r for r in caplog.records if r.name == "vlm_dpo_plugins.freeze"]
    assert len(records) == 1
    language, total = numel(model, groups["language"]), numel(model, [n for n, _ in model.named_parameters()])
    vision = numel(model, groups["vision"])
    message = records[0].getMessage()
    assert f"trainable parameters: {language:,} of {total:,} ({100 * language / total:.2f}%)" in message
    assert f"0 of {vision:>14,} trainable" in message
    assert f"{language:>14,} of {language:>14,} trainable (100.00% of the group" in message


def test_unfreeze_stages_are_refused_under_fsdp1_where_units_are_flattened_at_wrap_time(models):
    context = RunContext(framework="test", world_size=2, uses_fsdp=True, fsdp_version=1)
    manager = configured({"freeze": {"unfreeze": [{"at_step": 3, "groups": ["projector"]}]}})
    with pytest.raises(ConfigError, match=r"'freeze.unfreeze' stages cannot run under FSDP version 1: .* Use FSDP2"):
        manager.hook.vlm_dpo_train_begin(model=models["llava"], context=context)
    configured().hook.vlm_dpo_train_begin(model=models["llava"], context=context)  # no stages: fine


def test_the_logged_unfreeze_stage_rises_on_the_line_of_the_first_step_the_stage_trains_in():
    # A stage at step 2 starts when step index 2 begins; the Trainer logs that step with global_step 3.
    freeze = configured({"freeze": {"unfreeze": [{"at_step": 2, "groups": ["projector"]}]}}).get_plugin("freeze")
    logged = [freeze.vlm_dpo_metrics(step=global_step)["vlm_dpo/unfreeze_stage"] for global_step in (1, 2, 3, 4)]
    assert logged == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "context",
    [
        RunContext(framework="test", world_size=2),
        RunContext(framework="test", world_size=2, uses_fsdp=True, fsdp_version=2),
        RunContext(framework="test", world_size=2, uses_deepspeed=True, deepspeed_stage=2),
        RunContext(framework="test", uses_deepspeed=True, deepspeed_stage=3),
    ],
    ids=["ddp", "fsdp2", "zero2", "zero3"],
)
def test_unfreeze_stages_run_under_ddp_fsdp2_and_zero(models, context):
    # The adapters hold the later stages' parameters trainable from the start (tests/adapters/trl/test_ddp.py,
    # tests/sharded/test_fsdp2.py, tests/sharded/test_unfreeze_stages.py).
    manager = configured({"freeze": {"unfreeze": [{"at_step": 3, "groups": ["projector"]}]}})
    manager.hook.vlm_dpo_train_begin(model=models["llava"], context=context)


@pytest.mark.parametrize(
    "freeze, message",
    [
        (
            {"unfreeze": [{"at_step": 3}]},
            "'freeze.unfreeze[0]' is {'at_step': 3}; expected 'groups' or 'vision_blocks' > 0",
        ),
        (
            {"learning_rates": {"vision": 1e-6}},
            "'freeze.learning_rates' is {'vision': 1e-06}; expected rates only for groups that train",
        ),
        (
            {"unfreeze": [{"at_step": 3, "groups": ["projecter"]}]},
            (
                "'freeze.unfreeze[0].groups' has 'projecter'; expected one of ['vision', 'projector', 'language', "
                "'other']; did you mean 'projector'?"
            ),
        ),
    ],
)
def test_freeze_config_mistakes_name_the_key(freeze, message):
    with pytest.raises(ConfigError) as error:
        create_plugin_manager(load_entry_points=False).load_config({"freeze": freeze})
    assert message in str(error.value)


def test_a_vision_rate_is_accepted_when_a_stage_unfreezes_vision_blocks():
    config = create_plugin_manager(load_entry_points=False).load_config(
        {"freeze": {"learning_rates": {"vision": 1e-6}, "unfreeze": [{"at_step": 3, "vision_blocks": 2}]}}
    )
    assert config.freeze.groups_ever_trained() == {"language", "vision"}


def test_names_inside_activation_checkpoint_wrappers_are_the_models_own():
    # FSDP's activation checkpointing (ms-swift's --fsdp fsdp2) wraps layers in place after the groups were named:
    # every lookup by name must still find them (it was a KeyError in the freeze report).
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from vlm_dpo_plugins.freeze.names import named_parameters, plain_name
    from vlm_dpo_plugins.freeze.report import trainable_report

    model = torch.nn.Module()
    model.visual = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.language_model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    groups = {
        "vision": ["visual.0.weight", "visual.0.bias"],
        "language": ["language_model.0.weight", "language_model.0.bias"],
    }
    model.language_model[0] = checkpoint_wrapper(model.language_model[0])
    assert "language_model.0._checkpoint_wrapped_module.weight" in dict(model.named_parameters())
    assert plain_name("a._orig_mod.b._checkpoint_wrapped_module.c") == "a.b.c"
    assert sorted(name for name, _ in named_parameters(model)) == sorted(groups["vision"] + groups["language"])
    assert trainable_report(groups, model)["language"]["parameters"] == 9
