"""Each hook implementation called through a guard that names its plugin, for what it raises and what it returns.

pluggy calls the implementations of a hook in a loop; its result says neither which plugin
answered nor which one raised. So the manager wraps every implementation's function once, when
its plugin is registered (``attribute``):

- an exception raised by a third-party plugin becomes a ``PluginError`` naming the plugin and the
  hook, with the original as ``__cause__``. The package's own errors (``VLMDPOError``: a plugin
  refusing the config with ``ConfigError``, a guard halting with ``TrainingHalted``) are raised on
  purpose and keep their type and message; so do the built-ins' exceptions, which may be the
  framework's own (the collate hook calls the framework's collator). An exception that only passes
  through a wrapper (``wrapper=True``), raised by what it wraps, is left to name its own plugin.
- a value returned for a hook in ``RESULT_CHECKS`` (those whose answers reach the optimizer, the
  weights or the loss) is checked before pluggy hands it on; a bad one is a ``PluginError``
  naming the plugin, the hook and the value, raised before anything was changed.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Generator, Mapping
from typing import Any

from vlm_dpo_plugins.errors import PluginError, VLMDPOError
from vlm_dpo_plugins.shown import clipped, shown

LEARNING_RATE_SCALE_RANGE = "0 < scale <= 1"

ResultCheck = Callable[[Any], "str | None"]
"""Why a hook's answer cannot be used (completing "returned <value>: ..."), or None."""


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_learning_rate_scale(value: Any) -> str | None:
    # A back-off scales the rate down. Above 1 it would multiply the rate the user chose and the
    # schedule shapes (1e6 makes any optimizer diverge in a step); a schedule belongs to the LR scheduler.
    # 0 is no step at all, yet Adam would still move its moments: skipping is vlm_dpo_skip_step_reason's job.
    if value is None:
        return None
    if not _real(value):
        return f"a {type(value).__name__}, not a number"
    if not math.isfinite(value) or not 0 < value <= 1:
        return f"outside {LEARNING_RATE_SCALE_RANGE}"
    return None


def check_grad_norms(value: Any) -> str | None:
    from vlm_dpo_plugins.types import GradNorms

    if value is None:
        return None
    if not isinstance(value, GradNorms):
        return f"a {type(value).__name__}, not a GradNorms (or None)"
    # A non-finite norm is a measurement (an overflowing gradient) the skip check acts on; a negative one is not.
    norms = {"total": value.total, **{f"groups[{name!r}]": norm for name, norm in _items(value.groups)}}
    for name, norm in norms.items():
        if not _real(norm) or norm < 0:
            return f"a GradNorms whose {name} is {shown(norm)}, not a norm (a number >= 0, or NaN/Inf)"
    return None


def check_skip_reason(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return None
    return f"a {type(value).__name__}, not a reason (a string, or None)"


def check_loss_output(value: Any) -> str | None:
    from vlm_dpo_plugins.types import LossOutput

    if value is None:
        return None
    if not isinstance(value, LossOutput):
        return f"a {type(value).__name__}, not a LossOutput (or None)"
    import torch

    shapes = {}
    for name in ("losses", "chosen_rewards", "rejected_rewards"):
        tensor = getattr(value, name)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            return f"a LossOutput whose {name} is {shown(tensor)}, not a floating-point tensor"
        shapes[name] = tuple(tensor.shape)
    if len(set(shapes.values())) > 1 or len(shapes["losses"]) != 1:
        return f"a LossOutput with shapes {shapes}; expected one value per pair in each (1-D, equal lengths)"
    # NaN/Inf losses are left to the guards, which skip such a step (a bf16 overflow is not a plugin's fault).
    if not isinstance(value.metrics, Mapping) or not all(isinstance(key, str) for key in value.metrics):
        return f"a LossOutput whose metrics are {shown(value.metrics)}, not a mapping of names to numbers"
    return None


def check_optimizer_groups(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, list):
        return f"a {type(value).__name__}, not a list of groups (or None)"
    for index, group in enumerate(value):
        if not isinstance(group, Mapping) or not isinstance(group.get("group"), str):
            return f"a list whose item {index} is {shown(group)}, not a {{'group', 'names', 'lr'}} mapping"
        names, rate = group.get("names"), group.get("lr")
        if not isinstance(names, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in names):
            return f"a list whose group {group['group']!r} has names {shown(names)}, not a list of parameter names"
        if not _real(rate) or not math.isfinite(rate) or rate < 0:
            return f"a list whose group {group['group']!r} has lr {shown(rate)}, not a finite learning rate >= 0"
    return None


RESULT_CHECKS: dict[str, ResultCheck] = {
    "vlm_dpo_learning_rate_scale": check_learning_rate_scale,
    "vlm_dpo_clip_gradients": check_grad_norms,
    "vlm_dpo_skip_step_reason": check_skip_reason,
    "vlm_dpo_compute_loss": check_loss_output,
    "vlm_dpo_optimizer_groups": check_optimizer_groups,
}


def attribute(implementation: Any, hook: str, describe: Callable[[], str], third_party: bool) -> None:
    """Wrap a pluggy ``HookImpl``'s function in place; ``describe`` names its plugin (looked up when needed)."""
    function = implementation.function
    if getattr(function, "__vlm_dpo_attributed__", False) or implementation.hookwrapper:
        return  # old-style hookwrappers answer through pluggy's Result object, not by returning
    check = RESULT_CHECKS.get(hook)
    guard = _Guard(hook, describe, third_party, check)
    wrapped = guard.wrap_generator(function) if implementation.wrapper else guard.wrap(function)
    wrapped.__vlm_dpo_attributed__ = True
    implementation.function = wrapped


class _Guard:
    def __init__(self, hook: str, describe: Callable[[], str], third_party: bool, check: ResultCheck | None) -> None:
        self.hook, self.describe, self.third_party, self.check = hook, describe, third_party, check

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def call(*args: Any) -> Any:
            try:
                value = function(*args)
            except Exception as error:
                converted = self.attributed(error)
                if converted is error:
                    raise
                raise converted from error
            return self.checked(value)

        return call

    def wrap_generator(self, function: Callable[..., Generator]) -> Callable[..., Generator]:
        # pluggy drives a wrapper by hand: next() to the yield, then send(result) or throw(the wrapped calls' error).
        @functools.wraps(function)
        def call(*args: Any) -> Generator:
            inner = function(*args)
            sent: Any = None
            thrown: Exception | None = None
            started = False
            while True:
                try:
                    if not started:
                        started, step = True, next(inner)
                    elif thrown is not None:
                        step = inner.throw(thrown)
                    else:
                        step = inner.send(sent)
                except StopIteration as stop:
                    return self.checked(stop.value)
                except Exception as error:
                    converted = error if error is thrown else self.attributed(error)
                    if converted is error:
                        raise  # also what the wrapper wraps raised and it let through: that names its own plugin
                    raise converted from error
                thrown = None
                try:
                    sent = yield step
                except GeneratorExit:
                    inner.close()
                    raise
                except Exception as error:
                    thrown = error

        return call

    def attributed(self, error: Exception) -> Exception:
        if not self.third_party:
            return error
        if isinstance(error, VLMDPOError):
            if hasattr(error, "add_note"):  # Python >= 3.11: shown under the traceback
                error.add_note(f"raised by plugin {self.describe()} in {self.hook}")
            return error
        return PluginError(
            f"plugin {self.describe()} failed in {self.hook}: {type(error).__name__}: {clipped(str(error), 300)}. "
            "Fix the plugin, or leave it out with VLM_DPO_BLOCK_PLUGINS"
        )

    def checked(self, value: Any) -> Any:
        if self.check is not None:
            problem = self.check(value)
            if problem is not None:
                raise PluginError(
                    f"plugin {self.describe()}: {self.hook} returned {shown(value)}, {problem}. Nothing was applied; "
                    "fix the plugin, or leave it out with VLM_DPO_BLOCK_PLUGINS"
                )
        return value


def _items(groups: Any) -> list[tuple[Any, Any]]:
    return list(groups.items()) if isinstance(groups, Mapping) else [("?", groups)]
