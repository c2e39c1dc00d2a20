"""Merging tuned values into a user's DeepSpeed config: explicit keys win, "auto" is filled, every change reported."""

from __future__ import annotations

import copy
import json

import pytest

from vlm_dpo_plugins.errors import ConfigError, PluginError
from vlm_dpo_plugins.guards.deepspeed import PLUGIN_NAME, DeepSpeedTuning, tune_deepspeed_config
from vlm_dpo_plugins.guards.deepspeed_config import merge_deepspeed_config
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.markers import hookimpl
from vlm_dpo_plugins.types import RunContext

TUNED = {"zero_optimization.reduce_bucket_size": 16_777_216, "zero_optimization.allgather_bucket_size": 16_777_216}
CONTEXT = RunContext(framework="test", world_size=8, uses_deepspeed=True, mixed_precision="bf16")
# LLaVA-1.5-7B: 4096 wide, fully trained.
SEVEN_B = dict(trainable_parameters=6_700_000_000, hidden_size=4096, context=CONTEXT)


def manager_with_tuning(config=None, **extra_plugins):
    manager = create_plugin_manager(load_entry_points=False, extra_plugins=extra_plugins)
    if not manager.has_plugin(PLUGIN_NAME):  # until manager.builtin_plugins() registers it
        manager.register(DeepSpeedTuning(), name=PLUGIN_NAME)
    manager.hook.vlm_dpo_configure(config=manager.load_config(config or {}))
    return manager


def test_unset_keys_are_filled_and_reported():
    user = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    merge = merge_deepspeed_config(user, TUNED)
    assert merge.config["zero_optimization"] == {
        "stage": 2,
        "reduce_bucket_size": 16_777_216,
        "allgather_bucket_size": 16_777_216,
    }
    assert [str(change) for change in merge.changes] == [
        "zero_optimization.reduce_bucket_size: unset -> 16777216",
        "zero_optimization.allgather_bucket_size: unset -> 16777216",
    ]
    assert user == {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}  # the caller's dict is untouched


def test_explicit_values_are_kept_and_auto_is_filled():
    user = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8, "allgather_bucket_size": "auto"}}
    merge = merge_deepspeed_config(user, TUNED)
    assert merge.config["zero_optimization"]["reduce_bucket_size"] == 5e8
    assert merge.config["zero_optimization"]["allgather_bucket_size"] == 16_777_216
    assert [str(change) for change in merge.changes] == ["zero_optimization.allgather_bucket_size: 'auto' -> 16777216"]
    assert [str(kept) for kept in merge.kept] == [
        "zero_optimization.reduce_bucket_size: kept 500000000.0 (suggested 16777216)"
    ]
    assert merge.report() == (
        "DeepSpeed config: set zero_optimization.allgather_bucket_size: 'auto' -> 16777216"
        " | user values zero_optimization.reduce_bucket_size: kept 500000000.0 (suggested 16777216)"
    )


def test_a_user_value_equal_to_the_suggestion_is_neither_a_change_nor_a_conflict():
    user = {"zero_optimization": {"reduce_bucket_size": 16_777_216, "allgather_bucket_size": 16_777_216}}
    merge = merge_deepspeed_config(user, TUNED)
    assert merge.changes == [] and merge.kept == []
    assert merge.report() == "DeepSpeed config: unchanged"


def test_deepspeeds_other_spelling_of_a_key_counts_as_the_users_choice():
    user = {"zero_optimization": {"stage": 3, "prefetch_bucket_size": 1000, "param_persistence_threshold": "auto"}}
    merge = merge_deepspeed_config(
        user,
        {
            "zero_optimization.stage3_prefetch_bucket_size": 3686,
            "zero_optimization.stage3_param_persistence_threshold": 640,
        },
    )
    # Filled under the user's spelling: DeepSpeed must never see both names for one setting.
    assert merge.config["zero_optimization"] == {
        "stage": 3,
        "prefetch_bucket_size": 1000,
        "param_persistence_threshold": 640,
    }
    assert [str(kept) for kept in merge.kept] == [
        "zero_optimization.stage3_prefetch_bucket_size: kept 1000 (suggested 3686)"
    ]


def test_a_missing_section_is_created():
    merge = merge_deepspeed_config({}, TUNED)
    assert merge.config == {
        "zero_optimization": {"reduce_bucket_size": 16_777_216, "allgather_bucket_size": 16_777_216}
    }


def test_a_json_file_is_read_and_left_as_it_was(tmp_path):
    path = tmp_path / "ds_z2.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    merge = merge_deepspeed_config(path, TUNED)
    assert merge.config["zero_optimization"]["reduce_bucket_size"] == 16_777_216
    assert json.loads(path.read_text())["zero_optimization"]["reduce_bucket_size"] == "auto"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object, got list"),
    ],
)
def test_an_unreadable_config_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as error:
        merge_deepspeed_config(path, TUNED)
    assert str(path) in str(error.value)


def test_a_non_section_where_a_section_belongs_is_a_clear_error():
    with pytest.raises(ConfigError) as error:
        merge_deepspeed_config({"zero_optimization": "auto"}, TUNED)
    assert str(error.value) == (
        "DeepSpeed config key 'zero_optimization' is 'auto', not a section; cannot set "
        "'zero_optimization.reduce_bucket_size'. Write 'zero_optimization' as a JSON object."
    )


# -- through the plugin manager --------------------------------------------------------------------------------------


def test_the_plugin_tunes_stage_two_from_the_config():
    user = {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}, "bf16": {"enabled": "auto"}}
    merge = tune_deepspeed_config(manager_with_tuning(), user, **SEVEN_B)
    assert merge.config["zero_optimization"] == {
        "stage": 2,
        "reduce_bucket_size": 16_777_216,
        "allgather_bucket_size": 16_777_216,
    }
    assert merge.notes == []


def test_the_plugin_tunes_stage_three_keys_only_at_stage_three():
    merge = tune_deepspeed_config(manager_with_tuning(), {"zero_optimization": {"stage": 3}}, **SEVEN_B)
    assert merge.config["zero_optimization"] == {
        "stage": 3,
        "reduce_bucket_size": 16_777_216,
        "stage3_prefetch_bucket_size": 15_099_494,  # 0.9 x 16777216 = 15099494.4
        "stage3_param_persistence_threshold": 40_960,
    }


def test_gradient_dtype_follows_auto_through_the_run_context():
    # 256 ranks put the floor (256e6) above both ceilings, so the result shows which dtype was used.
    user = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}
    wide = dict(SEVEN_B, context=RunContext(framework="test", world_size=256, mixed_precision="bf16"))
    assert (
        tune_deepspeed_config(manager_with_tuning(), user, **wide).config["zero_optimization"]["reduce_bucket_size"]
        == 119_304_646
    )
    fp32_run = dict(wide, context=RunContext(framework="test", world_size=256, mixed_precision=None))
    assert (
        tune_deepspeed_config(manager_with_tuning(), user, **fp32_run).config["zero_optimization"]["reduce_bucket_size"]
        == 59_652_322
    )


@pytest.mark.parametrize(
    ("config", "user", "hidden_size"),
    [
        ({"guards": {"tune_deepspeed_buckets": False}}, {"zero_optimization": {"stage": 2}}, 4096),
        ({}, {"zero_optimization": {"stage": 2}}, None),  # width unknown: leave DeepSpeed's values alone
        ({}, {"zero_optimization": {"stage": 0}}, 4096),
        ({}, {"train_micro_batch_size_per_gpu": 1}, 4096),  # no zero_optimization section: ZeRO off
    ],
)
def test_nothing_is_changed_when_tuning_is_off_or_does_not_apply(config, user, hidden_size):
    merge = tune_deepspeed_config(
        manager_with_tuning(config), user, trainable_parameters=10**9, hidden_size=hidden_size, context=CONTEXT
    )
    assert merge.config == user and merge.changes == []


def test_two_plugins_disagreeing_on_a_key_is_an_error_naming_it():
    class OtherBuckets:
        @hookimpl
        def vlm_dpo_deepspeed_overrides(self, deepspeed_config, trainable_parameters, hidden_size, context):
            return {"zero_optimization.reduce_bucket_size": 2e8}

    manager = manager_with_tuning(other=OtherBuckets())
    with pytest.raises(PluginError, match="DeepSpeed 'zero_optimization.reduce_bucket_size'"):
        tune_deepspeed_config(manager, {"zero_optimization": {"stage": 2}}, **SEVEN_B)


def test_plugins_see_a_copy_of_the_config():
    class Vandal:
        @hookimpl
        def vlm_dpo_deepspeed_overrides(self, deepspeed_config, trainable_parameters, hidden_size, context):
            deepspeed_config["zero_optimization"]["stage"] = 0

    user = {"zero_optimization": {"stage": 2}}
    merge = tune_deepspeed_config(manager_with_tuning(vandal=Vandal()), copy.deepcopy(user), **SEVEN_B)
    assert merge.config["zero_optimization"]["stage"] == 2


def test_settings_that_let_nan_through_are_noted_not_changed():
    user = {
        "zero_optimization": {"stage": 2, "overlap_comm": True},
        "bf16": {"enabled": True, "check_grad_overflow": False},
    }
    merge = tune_deepspeed_config(manager_with_tuning(), user, **SEVEN_B)
    assert merge.config["zero_optimization"]["overlap_comm"] is True
    assert merge.config["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert merge.notes == [
        "zero_optimization.overlap_comm is true at ZeRO-2, where NaN gradient norms are reported with it "
        "(DeepSpeed issues #5347, #7188); set it false if grad_norm turns NaN",
        "bf16.check_grad_overflow is false: at ZeRO 1-2 in bf16 DeepSpeed then applies a NaN gradient to the "
        "weights instead of skipping the step; set it true (DeepSpeed's default)",
    ]
    assert merge.report().endswith("set it true (DeepSpeed's default)")


def test_an_unknown_zero_stage_is_a_clear_error():
    with pytest.raises(ConfigError) as error:
        tune_deepspeed_config(manager_with_tuning(), {"zero_optimization": {"stage": "two"}}, **SEVEN_B)
    assert str(error.value) == "DeepSpeed 'zero_optimization.stage' is 'two'; expected 0, 1, 2 or 3"


def test_the_switch_is_a_validated_config_key():
    with pytest.raises(ConfigError, match="did you mean 'guards.tune_deepspeed_buckets'"):
        manager_with_tuning({"guards": {"tune_deepspeed_bucket": False}})
