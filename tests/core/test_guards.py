"""Stability guards plugin: skip votes, the consecutive-skip halt, metrics, state and the config section."""

from __future__ import annotations

import math

import pytest

from vlm_dpo_plugins.errors import ConfigError, TrainingHalted
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import GradNorms, StepSignals


def configured(guards=None):
    manager = create_plugin_manager(load_entry_points=False)
    manager.hook.vlm_dpo_configure(config=manager.load_config({"guards": guards or {}}))
    return manager


@pytest.fixture
def manager():
    return configured({"max_consecutive_skips": 3})


def reasons(manager, loss, grad_norm, group_grad_norms=None):
    signals = StepSignals(0, loss, grad_norm, group_grad_norms=group_grad_norms or {})
    return [reason for reason in manager.hook.vlm_dpo_skip_step_reason(signals=signals) if reason]


@pytest.mark.parametrize(
    "loss, grad_norm, group_grad_norms, expected",
    [
        (0.69, 1.0, {"language": 1.0}, []),
        (float("nan"), 1.0, {}, ["non-finite loss (nan)"]),
        (0.69, float("inf"), {}, ["non-finite gradient norm (inf)"]),
        (
            0.69,
            float("nan"),
            {"vision": 0.5, "projector": float("inf"), "language": float("nan")},
            ["non-finite gradient norm (nan) in group(s) projector, language"],
        ),
        (0.69, None, {}, []),  # no gradients measured (e.g. ZeRO partitions): only the loss is judged
    ],
)
def test_skip_votes_name_the_cause_and_the_group(manager, loss, grad_norm, group_grad_norms, expected):
    assert reasons(manager, loss, grad_norm, group_grad_norms) == expected


def test_skipping_can_be_switched_off():
    assert reasons(configured({"skip_nonfinite": False}), float("nan"), float("nan")) == []


def test_a_spike_is_a_skip_vote_only_when_asked_for():
    watched, skipping = configured({"spike_window": 3}), configured({"spike_window": 3, "skip_spikes": True})
    for manager in (watched, skipping):
        for loss in (1.0, 2.0, 1.5):
            assert reasons(manager, loss, 1.0) == []  # the window is not full yet
            take(manager, loss=loss)
    assert reasons(watched, 4.6, 1.0) == []  # 4.6 > 3 x the median 1.5: counted and logged, but the step is taken
    assert reasons(skipping, 4.5, 1.0) == []  # not above 3 x 1.5
    assert reasons(skipping, 4.6, 1.0) == ["loss spike (4.6 > 3 x the median 1.5 of the previous 3 losses)"]
    assert list(skipping.get_plugin("guards").spikes.recent) == [1.0, 2.0, 1.5], "asking must not record the loss"


def guard_metrics(manager, step=0):
    return manager.get_plugin("guards").vlm_dpo_metrics(step=step)


def skip(manager, step=7, reason="non-finite loss (nan)"):
    signals = StepSignals(step=step, loss=float("nan"), grad_norm=None)
    manager.hook.vlm_dpo_after_optimizer_step(signals=signals, skipped=True, reasons=[reason])


def take(manager, step=7, loss=0.5):
    signals = StepSignals(step=step, loss=loss, grad_norm=1.0, group_grad_norms={"language": 1.0})
    manager.hook.vlm_dpo_after_optimizer_step(signals=signals, skipped=False, reasons=[])


def test_consecutive_skips_halt_naming_the_causes_and_settings(manager):
    skip(manager)
    take(manager)  # a step taken resets the run of skips
    skip(manager)
    skip(manager)
    with pytest.raises(TrainingHalted) as halted:
        skip(manager, step=9, reason="rank 1: non-finite gradient norm (nan) in group(s) vision")
    message = str(halted.value)
    assert message.startswith(
        "3 consecutive optimizer steps skipped (last at step 9: rank 1: non-finite gradient norm (nan) in group(s) "
        "vision). Training cannot recover by skipping. Likely causes:"
    )
    for setting in ("guards.max_grad_norm", "guards.group_max_grad_norm", "guards.lr_backoff_factor",
                    "loss.fp32_logps", "guards.max_consecutive_skips", "vlm_dpo/grad_norm/<group>"):
        assert setting in message
    assert guard_metrics(manager)["vlm_dpo/skipped_steps"] == 4.0


def test_a_skip_is_logged_with_its_reason_and_counts(manager, caplog):
    skip(manager, step=4, reason="non-finite loss (inf)")
    assert caplog.messages == [
        "step 4: optimizer step skipped on every rank (non-finite loss (inf)); weights, optimizer state and "
        "learning-rate schedule unchanged (1 skipped, 1 in a row, halt at 3)"
    ]


def test_metrics_report_the_last_pre_clip_norms_per_group(manager):
    metrics = guard_metrics(manager)
    assert "vlm_dpo/grad_norm" not in metrics  # nothing measured yet: no made-up zero
    signals = StepSignals(step=1, loss=0.6, grad_norm=13.0, group_grad_norms={"vision": 5.0, "projector": 12.0})
    manager.hook.vlm_dpo_after_optimizer_step(signals=signals, skipped=False, reasons=[])
    assert guard_metrics(manager) == {
        "vlm_dpo/skipped_steps": 0.0,
        "vlm_dpo/loss_spikes": 0.0,
        "vlm_dpo/lr_scale": 1.0,
        "vlm_dpo/grad_norm": 13.0,
        "vlm_dpo/grad_norm_clipped": 1.0,  # the default max_grad_norm
        "vlm_dpo/grad_norm/vision": 5.0,
        "vlm_dpo/grad_norm/projector": 12.0,
    }


def test_the_post_clip_norm_follows_group_clipping_then_the_total():
    from vlm_dpo_plugins.guards.clipping import norm_after_clipping

    norms = GradNorms(total=13.0, groups={"vision": 5.0, "projector": 12.0})
    assert norm_after_clipping(norms, None) == 13.0
    assert norm_after_clipping(norms, 20.0, {"projector": 1e-9}) == pytest.approx(5.0)
    # vision 5 -> 3 by its own cap; sqrt(3**2 + 4**2) = 5 once projector is capped at 4; then the total cap of 4.5.
    assert norm_after_clipping(norms, None, {"vision": 3.0, "projector": 4.0}) == pytest.approx(5.0, rel=1e-5)
    assert norm_after_clipping(norms, 4.5, {"vision": 3.0, "projector": 4.0}) == 4.5


def test_guard_state_survives_a_save_and_restore():
    guards = {"lr_backoff_factor": 0.5, "lr_backoff_steps": 4, "spike_window": 3}
    manager = configured(guards)
    for loss in (1.0, 1.0, 1.0, 9.0):  # the fourth is a spike and starts a back-off
        take(manager, loss=loss)
    skip(manager)
    saved = dict(pair for pair in manager.hook.vlm_dpo_state_dict() if pair)
    assert saved["guards"] == {
        "skipped_steps": 1,
        "consecutive_skips": 1,
        "spikes": {"recent": [1.0, 1.0, 9.0], "spikes": 1},
        "backoff": {"remaining": 4},
    }
    resumed = configured(guards)
    resumed.hook.vlm_dpo_load_state_dict(states=saved)
    assert dict(pair for pair in resumed.hook.vlm_dpo_state_dict() if pair) == saved
    assert resumed.hook.vlm_dpo_learning_rate_scale(step=8) == 0.5


@pytest.mark.parametrize(
    "guards, message",
    [
        ({"spike_factor": 1.0}, "'guards.spike_factor' is 1.0; expected a factor > 1, or null to disable"),
        ({"spike_window": 2}, "'guards.spike_window' is 2; expected an integer >= 3"),
        (
            {"spike_factor": None, "skip_spikes": True},
            "'guards.skip_spikes' is True; expected false while spike_factor is null",
        ),
        ({"lr_backoff_factor": 1.5}, "'guards.lr_backoff_factor' is 1.5; expected a factor in (0, 1)"),
        ({"lr_backoff_steps": 0}, "'guards.lr_backoff_steps' is 0; expected an integer >= 1"),
        ({"lr_backoff_on": ["spikes"]}, "'guards.lr_backoff_on[0]' is 'spikes'; expected one of ['skip', 'spike']"),
        ({"group_max_grad_norm": {"vison": 1.0}}, "'guards.group_max_grad_norm' has 'vison'; expected one of"),
        ({"group_max_grad_norm": {"vision": 0}}, "'guards.group_max_grad_norm.vision' is 0.0; expected a norm > 0"),
    ],
)
def test_bad_guard_settings_name_the_key(guards, message):
    with pytest.raises(ConfigError) as error:
        configured(guards)
    assert str(error.value).startswith(message)


def test_defaults_clip_skip_and_detect_spikes_but_do_not_back_off():
    config = create_plugin_manager(load_entry_points=False).load_config({}).guards
    assert (config.max_grad_norm, config.skip_nonfinite, config.spike_factor) == (1.0, True, 3.0)
    assert config.lr_backoff_factor is None and config.group_max_grad_norm == {}
    assert math.isclose(configured().hook.vlm_dpo_learning_rate_scale(step=0), 1.0)
