"""The detectors on synthetic metric streams and step signals: when each fires, what it names, and its metrics."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_dpo_plugins.diagnostics.batch import batch_facts
from vlm_dpo_plugins.diagnostics.replay import replay_detectors
from vlm_dpo_plugins.diagnostics.series import correlation, detrended, sign_changes, slope
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import RunContext, StepSignals

LN2 = math.log(2)


def configured(config=None):
    manager = create_plugin_manager(load_entry_points=False)
    manager.hook.vlm_dpo_configure(config=manager.load_config(config or {}))
    return manager


def on_log(manager, step, **metrics):
    renamed = {key.replace("__", "/"): value for key, value in metrics.items()}
    return [f for found in manager.hook.vlm_dpo_on_log(step=step, metrics=renamed) for f in found]


def metrics_of(manager) -> dict:
    merged = {}
    for found in manager.hook.vlm_dpo_metrics(step=0):
        merged.update(found)
    return merged


class TwoPartVLM(torch.nn.Module):
    """Parameter names the LLaVA layout classifies: a vision tower and a language model."""

    def __init__(self):
        super().__init__()
        self.vision_tower = torch.nn.Linear(2, 2)
        self.language_model = torch.nn.Linear(2, 2)


def started(config=None, model=None):
    manager = configured(config)
    model = model or TwoPartVLM()
    manager.hook.vlm_dpo_train_begin(model=model, context=RunContext(framework="test", model_type="llava"))
    return manager, model


def step(manager, index, loss=0.5, norm=1.0, groups=None, skipped=False):
    signals = StepSignals(step=index, loss=loss, grad_norm=norm, group_grad_norms=groups or {})
    manager.hook.vlm_dpo_after_optimizer_step(signals=signals, skipped=skipped, reasons=[])


# -- series -------------------------------------------------------------------------------


def test_series_against_closed_forms():
    assert slope([1.0, 3.0, 5.0, 7.0]) == pytest.approx(2.0)
    assert detrended([1.0, 3.0, 5.0, 7.0]) == pytest.approx([0.0, 0.0, 0.0, 0.0])
    assert correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert correlation([1, 1, 1], [1, 2, 3]) is None
    assert sign_changes([1.0, -1.0, 0.0, -2.0, 3.0]) == 2


# -- rising loss at chance accuracy ------------------------------------------------------------


def drifting_stream(count, loss_rise=0.002):
    """Loss creeping up, accuracy 0.5, both rewards swinging together far more than their margin."""
    for index in range(count):
        shared = 0.3 * math.sin(index)
        yield dict(
            loss=LN2 + loss_rise * index,
            rewards__accuracies=0.5 if index % 2 else 0.55,
            rewards__chosen=shared + 0.001,
            rewards__rejected=shared,
            rewards__margins=0.001,
            learning_rate=1e-6,
        )


def test_rising_loss_with_rewards_moving_together_names_the_trainable_vision_tower():
    manager, _ = started({"diagnostics": {"trend_steps": 6}})
    found = [f for index, metrics in enumerate(drifting_stream(8), start=1) for f in on_log(manager, index, **metrics)]
    assert [f.code for f in found] == ["loss-rising-accuracy-chance"]
    assert found[0].step == 6
    assert "the vision tower is trainable" in found[0].message
    assert "correlation of their step changes 1.00" in found[0].message
    assert metrics_of(manager)["vlm_dpo/diag/reward_comovement"] == pytest.approx(1.0)


def test_with_vision_frozen_the_cause_is_the_learning_rate():
    model = TwoPartVLM()
    model.vision_tower.requires_grad_(False)
    manager, _ = started({"diagnostics": {"trend_steps": 6}}, model)
    stream = [dict(metrics, learning_rate=1e-4) for metrics in drifting_stream(6)]
    [finding] = [f for index, metrics in enumerate(stream, start=1) for f in on_log(manager, index, **metrics)]
    assert "learning rate 0.0001 is too high for DPO" in finding.message


@pytest.mark.parametrize(
    "change",
    [
        {"loss_falls": True},
        {"accuracy": 0.9},
        {"rewards_apart": True},
    ],
    ids=["loss-falls", "accuracy-learned", "rewards-move-apart"],
)
def test_rising_loss_needs_all_three_signs(change):
    manager, _ = started({"diagnostics": {"trend_steps": 6}})
    for index, metrics in enumerate(drifting_stream(10), start=1):
        if change.get("loss_falls"):
            metrics["loss"] = LN2 - 0.01 * index
        if "accuracy" in change:
            metrics["rewards/accuracies"] = change["accuracy"]
            metrics.pop("rewards__accuracies")
        if change.get("rewards_apart"):
            metrics["rewards__rejected"] = -metrics["rewards__chosen"]
            metrics["rewards__margins"] = 2 * metrics["rewards__chosen"]
        assert on_log(manager, index, **metrics) == []


# -- margin oscillation -------------------------------------------------------------------------


def test_a_margin_swinging_around_zero_reports_its_period_and_amplitude():
    # An odd window of +-0.4 is symmetric about its centre: trend 0, so the amplitude is exactly 0.4.
    manager, _ = started({"diagnostics": {"oscillation_steps": 9}})
    found = []
    for index in range(1, 10):
        found += on_log(manager, index, loss=0.6, rewards__margins=0.4 if index % 2 else -0.4)
    assert [f.code for f in found] == ["margin-oscillation"]
    assert "period of 2.0 logged steps and an amplitude of 0.400," in found[0].message
    measured = metrics_of(manager)
    assert measured["vlm_dpo/diag/margin_period"] == pytest.approx(2.0)
    assert measured["vlm_dpo/diag/margin_amplitude"] == pytest.approx(0.4)


def test_a_climbing_noisy_margin_is_not_an_oscillation():
    manager, _ = started({"diagnostics": {"oscillation_steps": 8}})
    for index in range(1, 30):
        noise = 0.05 if index % 2 else -0.05
        assert on_log(manager, index, loss=0.6, rewards__margins=0.1 * index + noise) == []
    assert metrics_of(manager)["vlm_dpo/diag/margin_amplitude"] < 0.1


# -- gradients ------------------------------------------------------------------------------------------


def test_a_trainable_group_without_gradients_for_n_steps_is_named():
    manager, _ = started({"diagnostics": {"no_gradient_steps": 2}})
    step(manager, 0, groups={"language": 0.5})  # the vision tower's .grad stayed None
    assert on_log(manager, 1, loss=0.6) == []
    step(manager, 1, groups={"language": 0.4})
    [finding] = on_log(manager, 2, loss=0.55)
    assert finding.code == "no-gradient"
    assert "group(s) vision received no usable gradient for 2+ optimizer steps" in finding.message
    assert "trainable group(s) vision had no gradient (.grad is None)" in finding.message
    assert "no gradient path" in finding.message


def test_under_zero_the_framework_norm_alone_concludes_nothing():
    manager, _ = started({"diagnostics": {"no_gradient_steps": 1}})
    for index in range(3):
        step(manager, index, norm=0.7, groups={})
        assert on_log(manager, index + 1, loss=0.6) == []


def test_non_finite_names_the_first_group_in_forward_order_once():
    manager, _ = started()
    step(manager, 4, norm=math.inf, groups={"language": math.inf, "vision": math.nan, "projector": 0.2}, skipped=True)
    [finding] = on_log(manager, 5, loss=0.6)
    assert finding.code == "non-finite" and finding.step == 5 and finding.severity.value == "warning"
    assert "first offending parameter group: vision (also language); finite: projector 0.2" in finding.message
    step(manager, 5, loss=math.nan, norm=None, skipped=True)
    assert on_log(manager, 6, loss=0.6) == []
    assert metrics_of(manager)["vlm_dpo/diag/non_finite_steps"] == 2


def test_a_non_finite_step_the_framework_applied_is_an_error():
    manager, _ = started()
    step(manager, 0, loss=math.inf, norm=1.0, skipped=False)
    [finding] = on_log(manager, 1, loss=math.inf)
    assert finding.severity.value == "error" and "APPLIED" in finding.message
    assert "the forward pass already overflowed" in finding.message


# -- the batch explains a stall -------------------------------------------------------------------


def test_batch_facts_count_identical_and_masked_responses():
    ids = torch.tensor([[1, 5, 6, 0], [1, 7, 8, 9], [1, 5, 6, 0], [1, 7, 3, 3]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]])
    facts = batch_facts({"input_ids": ids, "completion_mask": mask, "attention_mask": (ids > 0).long()}, step=3)
    assert (facts.pairs, facts.identical_pairs, facts.masked_responses) == (2, 1, 1)
    assert batch_facts({"input_ids": ids[:3], "completion_mask": mask[:3]}, step=0) is None


def test_a_stall_with_a_small_beta_names_beta():
    manager, _ = started({"loss": {"beta": 0.001}, "diagnostics": {"stall_steps": 2}})
    step(manager, 0, groups={"vision": 0.1, "language": 0.2})
    on_log(manager, 1, loss=LN2, rewards__margins=0.0)
    [finding] = on_log(manager, 2, loss=LN2, rewards__margins=0.0)
    assert finding.code == "loss-stuck-at-ln2" and "beta = 0.001 is so small" in finding.message


# -- replay, state and settings ---------------------------------------------------------------------


def test_replay_finds_the_metric_stream_causes_in_a_finished_log():
    records = [dict(step=index, loss=LN2, **{"rewards/margins": 0.0}) for index in range(1, 12)]
    records.append({"step": 12, "loss": math.nan, "grad_norm": math.nan, "vlm_dpo/grad_norm/projector": math.inf})
    codes = [(f.code, f.step) for f in replay_detectors(records)]
    assert codes == [("loss-stuck-at-ln2", 10), ("non-finite", 12)]
    [non_finite] = [f for f in replay_detectors(records) if f.code == "non-finite"]
    assert "first offending parameter group: projector" in non_finite.message


def test_detector_state_survives_a_checkpoint():
    manager, _ = started({"diagnostics": {"stall_steps": 3, "trend_steps": 6}})
    on_log(manager, 1, loss=LN2, rewards__margins=0.0)
    on_log(manager, 2, loss=LN2, rewards__margins=0.0)
    [(name, state)] = [r for r in manager.hook.vlm_dpo_state_dict() if r and r[0] == "diagnostics"]
    resumed, _ = started({"diagnostics": {"stall_steps": 3, "trend_steps": 6}})
    resumed.hook.vlm_dpo_load_state_dict(states={name: state})
    assert [f.code for f in on_log(resumed, 3, loss=LN2, rewards__margins=0.0)] == ["loss-stuck-at-ln2"]


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"trend_steps": 2}, "'diagnostics.trend_steps' is 2"),
        ({"accuracy_band": 0.7}, "'diagnostics.accuracy_band' is 0.7"),
        ({"no_gradient_steps": 0}, "'diagnostics.no_gradient_steps' is 0"),
    ],
)
def test_bad_detector_settings_fail_naming_the_key(setting, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        configured({"diagnostics": setting})
