"""What a plugin's hook returns or raises, checked where it enters and attributed to that plugin.

A learning-rate scale, gradient norms, a skip reason, a loss or optimizer groups that cannot be used
is a ``PluginError`` naming the plugin, before anything was applied; an exception raised in a
third-party hook names the plugin and the hook and keeps the original as its cause; the package's
own errors keep their type. Entry points named like a registered plugin are refused.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from distributions import install_distribution

from vlm_dpo_plugins import hookimpl
from vlm_dpo_plugins.errors import ConfigError, PluginError, TrainingHalted
from vlm_dpo_plugins.guards.step import StepGuard
from vlm_dpo_plugins.losses.compute import compute_preference_loss
from vlm_dpo_plugins.losses.logprobs import SequenceLogps
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import GradNorms, LossOutput

FIX = "Nothing was applied; fix the plugin, or leave it out with VLM_DPO_BLOCK_PLUGINS"


class Fixed:
    """A third-party plugin answering one hook with a fixed value."""

    def __init__(self, value):
        self.value = value


class Scale(Fixed):
    @hookimpl
    def vlm_dpo_learning_rate_scale(self, step):
        return self.value


class Norms(Fixed):
    @hookimpl
    def vlm_dpo_clip_gradients(self, parameters):
        return self.value


class Reason(Fixed):
    @hookimpl
    def vlm_dpo_skip_step_reason(self, signals):
        return self.value


class Groups(Fixed):
    @hookimpl
    def vlm_dpo_optimizer_groups(self, groups, trainable, base_learning_rate):
        return self.value


ANSWERS = {"vlm_dpo_clip_gradients": Norms, "vlm_dpo_skip_step_reason": Reason}


def manager_with(**plugins):
    manager = create_plugin_manager(load_entry_points=False, extra_plugins=plugins)
    manager.hook.vlm_dpo_configure(config=manager.default_config())
    return manager


class TinyRun:
    """One linear layer under AdamW, a gradient ready to step."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 2)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.step(StepGuard(manager_with()), 0)  # Adam state exists: a later change to it would show

    def backward(self):
        self.optimizer.zero_grad()
        self.model(torch.ones(4, 3)).pow(2).sum().backward()

    def step(self, guard, step):
        self.backward()
        return guard.step(self.optimizer, {"language": list(self.model.parameters())}, 1.0, step)

    def state(self):
        return copy.deepcopy({"weights": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})


def assert_same_state(before, after):
    assert before["optimizer"]["param_groups"] == after["optimizer"]["param_groups"]
    for name, value in before["weights"].items():
        assert torch.equal(value, after["weights"][name]), name
    for key, state in before["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(value, after["optimizer"]["state"][key][field]), (key, field)


@pytest.mark.parametrize(
    "scale, shown, problem",
    [
        (math.nan, "nan", "outside 0 < scale <= 1"),
        (-1.0, "-1.0", "outside 0 < scale <= 1"),
        (1e6, "1000000.0", "outside 0 < scale <= 1"),
        (0, "0", "outside 0 < scale <= 1"),
        (math.inf, "inf", "outside 0 < scale <= 1"),
        (True, "True", "a bool, not a number"),
        ("0.5", "'0.5'", "a str, not a number"),
    ],
)
def test_a_bad_learning_rate_scale_is_refused_naming_the_plugin_and_nothing_changes(scale, shown, problem):
    run = TinyRun()
    guard = StepGuard(manager_with(backoff=Scale(scale)))
    run.backward()
    before = run.state()
    with pytest.raises(PluginError) as error:
        guard.step(run.optimizer, {"language": list(run.model.parameters())}, 1.0, 1)
    assert str(error.value) == (
        f"plugin 'backoff' (registered at run time): vlm_dpo_learning_rate_scale returned {shown}, {problem}. {FIX}"
    )
    assert_same_state(before, run.state())
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_a_valid_scale_is_applied_and_logged_as_applied():
    run = TinyRun()
    manager = manager_with(backoff=Scale(0.25))
    guard = StepGuard(manager)
    used = []
    run.optimizer.step = (lambda step: lambda: (used.append(run.optimizer.param_groups[0]["lr"]), step()))(
        run.optimizer.step
    )
    outcome = run.step(guard, 1)
    assert outcome.learning_rate_scale == 0.25 and used == [0.025]
    assert run.optimizer.param_groups[0]["lr"] == 0.1  # restored after the step
    metrics = manager.get_plugin("guards").vlm_dpo_metrics(step=1)
    assert metrics["vlm_dpo/lr_scale"] == 0.25  # the plugin's scale, not the guards' own 1.0

    manager.get_plugin("backoff").value = None  # defers to the guards' back-off: none
    assert run.step(guard, 2).learning_rate_scale == 1.0
    assert manager.get_plugin("guards").vlm_dpo_metrics(step=2)["vlm_dpo/lr_scale"] == 1.0


def test_a_skipped_step_logs_no_scale():
    run = TinyRun()
    manager = manager_with(
        backoff=Scale(0.5), veto=Reason("veto")
    )
    outcome = run.step(StepGuard(manager), 1)
    assert outcome.skipped and outcome.learning_rate_scale == 1.0
    assert manager.get_plugin("guards").vlm_dpo_metrics(step=1)["vlm_dpo/lr_scale"] == 1.0


@pytest.mark.parametrize(
    "hook, value, message",
    [
        ("vlm_dpo_clip_gradients", 3.5, "returned 3.5, a float, not a GradNorms (or None)"),
        (
            "vlm_dpo_clip_gradients",
            GradNorms(total=-1.0),
            "returned GradNorms(total=-1.0, groups={}), a GradNorms whose total is -1.0, not a norm (a number >= 0, "
            "or NaN/Inf)",
        ),
        ("vlm_dpo_skip_step_reason", True, "returned True, a bool, not a reason (a string, or None)"),
    ],
)
def test_bad_step_answers_are_refused_before_the_step(hook, value, message):
    run = TinyRun()
    guard = StepGuard(manager_with(other=ANSWERS[hook](value)))
    run.backward()
    before = run.state()
    with pytest.raises(PluginError) as error:
        guard.step(run.optimizer, {"language": list(run.model.parameters())}, 1.0, 1)
    assert str(error.value) == f"plugin 'other' (registered at run time): {hook} {message}. {FIX}"
    assert_same_state(before, run.state())


def test_a_non_finite_gradient_norm_is_a_measurement_the_guards_skip_on():
    run = TinyRun()
    guard = StepGuard(manager_with(other=Norms(GradNorms(total=math.inf))))
    outcome = run.step(guard, 1)
    assert outcome.skipped and outcome.reasons == ("non-finite gradient norm (inf)",)


def test_optimizer_groups_with_a_nan_rate_are_refused():
    groups = [{"group": "language", "names": ["w"], "lr": math.nan}]
    manager = manager_with(other=Groups(groups))
    with pytest.raises(PluginError) as error:
        manager.hook.vlm_dpo_optimizer_groups(groups={"language": ["w"]}, trainable={"w"}, base_learning_rate=1e-5)
    assert str(error.value) == (
        "plugin 'other' (registered at run time): vlm_dpo_optimizer_groups returned [{'group': 'language', "
        "'lr': nan, 'names': ['w']}], a list whose group 'language' has lr nan, not a finite learning rate >= 0. "
        f"{FIX}"
    )


# ---------------------------------------------------------------- losses


def two_pairs():
    values = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    return SequenceLogps(values, torch.tensor([3, 3, 3, 3]))


class Variant:
    """A third-party loss variant, ``mine``, whose function does what the test asks."""

    def __init__(self, function):
        self.function = function

    @hookimpl
    def vlm_dpo_loss_functions(self):
        return {"mine": self.function}


def loss_with(function, **others):
    manager = manager_with(variant=Variant(function), **others)
    config = manager.load_config({"loss": {"type": "mine"}})
    return lambda: compute_preference_loss(manager, config, two_pairs(), two_pairs(), pairs=2)


def test_a_variant_that_raises_is_named_with_its_plugin():
    with pytest.raises(PluginError) as error:
        loss_with(lambda logps, config: 1 / 0)()
    assert str(error.value) == (
        "the loss variant 'mine' of plugin 'variant' (registered at run time) failed: ZeroDivisionError: division "
        "by zero"
    )
    assert isinstance(error.value.__cause__, ZeroDivisionError)


def test_a_variant_whose_output_has_no_loss_per_pair_is_refused():
    def scalar(logps, config):
        return LossOutput(logps.chosen.sum(), logps.chosen.sum(), logps.rejected.sum())

    def whole_numbers(logps, config):
        return LossOutput(torch.tensor([1, 2]), logps.chosen, logps.rejected)

    with pytest.raises(PluginError, match=r"^the loss variant 'mine' of plugin 'variant' \(registered at run time\) "
                       r"returned LossOutput\(.*\), a LossOutput with shapes \{'losses': \(\), "):
        loss_with(scalar)()
    with pytest.raises(PluginError, match=r"a LossOutput whose losses is tensor\(\[1, 2\]\), not a floating-point "):
        loss_with(whole_numbers)()


def test_a_nan_loss_is_left_to_the_guards():
    output, _ = loss_with(lambda logps, config: LossOutput(logps.chosen * math.nan, logps.chosen, logps.rejected))()
    assert torch.isnan(output.losses).all()


class Wrapper:
    """A third-party wrapper of the loss hook: passes results through, or fails itself when asked."""

    def __init__(self, fail: bool):
        self.fail = fail

    @hookimpl(wrapper=True)
    def vlm_dpo_compute_loss(self, logps, config):
        result = yield
        if self.fail:
            raise KeyError("metrics")
        return result


def test_an_error_passing_through_a_wrapper_names_where_it_was_raised():
    with pytest.raises(PluginError, match=r"^the loss variant 'mine' of plugin 'variant' .* ZeroDivisionError"):
        loss_with(lambda logps, config: 1 / 0, outer=Wrapper(fail=False))()


def test_an_error_raised_by_a_wrapper_names_the_wrapper():
    def sigmoid_like(logps, config):
        return LossOutput(-logps.chosen, logps.chosen, logps.rejected)

    with pytest.raises(PluginError) as error:
        loss_with(sigmoid_like, outer=Wrapper(fail=True))()
    assert str(error.value) == (
        "plugin 'outer' (registered at run time) failed in vlm_dpo_compute_loss: KeyError: 'metrics'. Fix the "
        "plugin, or leave it out with VLM_DPO_BLOCK_PLUGINS"
    )
    assert isinstance(error.value.__cause__, KeyError)


# ---------------------------------------------------------------- exceptions


class Raises:
    def __init__(self, error):
        self.error = error

    @hookimpl
    def vlm_dpo_configure(self, config):
        raise self.error

    @hookimpl
    def vlm_dpo_skip_step_reason(self, signals):
        raise self.error


def test_a_third_party_exception_names_plugin_and_hook_and_keeps_the_original():
    original = ValueError("bad threshold")
    with pytest.raises(PluginError) as error:
        manager_with(picky=Raises(original))
    assert str(error.value) == (
        "plugin 'picky' (registered at run time) failed in vlm_dpo_configure: ValueError: bad threshold. Fix the "
        "plugin, or leave it out with VLM_DPO_BLOCK_PLUGINS"
    )
    assert error.value.__cause__ is original


def test_the_package_s_own_errors_keep_their_type_and_message():
    refusal = ConfigError("'picky.threshold' must be positive")
    with pytest.raises(ConfigError) as error:
        manager_with(picky=Raises(refusal))
    assert error.value is refusal and str(error.value) == "'picky.threshold' must be positive"
    note = "raised by plugin 'picky' (registered at run time) in vlm_dpo_configure"
    assert note in getattr(error.value, "__notes__", [note])  # Python 3.10 has no notes


def test_a_built_in_s_halt_is_not_rewrapped():
    manager = create_plugin_manager(load_entry_points=False)
    manager.hook.vlm_dpo_configure(config=manager.load_config({"guards": {"max_consecutive_skips": 1}}))
    run = TinyRun()
    run.backward()
    run.model.weight.grad.fill_(math.nan)
    with pytest.raises(TrainingHalted, match=r"^1 consecutive optimizer steps skipped"):
        StepGuard(manager).step(run.optimizer, {"language": list(run.model.parameters())}, 1.0, 1)


# ---------------------------------------------------------------- entry points


PLUGIN_MODULE = (
    "from vlm_dpo_plugins import hookimpl\n\n@hookimpl\ndef vlm_dpo_skip_step_reason(signals):\n    return None\n"
)


def test_an_entry_point_named_like_a_built_in_is_an_error_naming_its_distribution(tmp_path, monkeypatch):
    (tmp_path / "vlm_dpo_imposter.py").write_text(PLUGIN_MODULE)
    install_distribution(tmp_path, "vlm-dpo-imposter", "0.3", "guards = vlm_dpo_imposter", monkeypatch)
    with pytest.raises(PluginError) as error:
        create_plugin_manager()
    assert str(error.value) == (
        "the entry point 'guards' of vlm-dpo-imposter 0.3 (vlm_dpo_imposter) has the name of the built-in plugin "
        "'guards' (builtin), so it cannot be registered. Fix: rename the entry point in that distribution, or "
        "uninstall it, or load only other plugins with VLM_DPO_LOAD_PLUGINS=name,name"
    )


def test_an_entry_point_s_error_names_its_distribution(tmp_path, monkeypatch):
    (tmp_path / "vlm_dpo_flaky.py").write_text(PLUGIN_MODULE.replace("return None", "raise OSError('sensor gone')"))
    install_distribution(tmp_path, "vlm-dpo-flaky", "2.0", "flaky = vlm_dpo_flaky", monkeypatch)
    manager = create_plugin_manager()
    with pytest.raises(PluginError) as error:
        TinyRun().step(StepGuard(manager), 1)
    assert str(error.value).startswith(
        "plugin 'flaky' (entry point, vlm-dpo-flaky 2.0) failed in vlm_dpo_skip_step_reason: OSError: sensor gone."
    )
