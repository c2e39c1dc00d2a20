"""Gradient facts per optimizer step: trainable groups that get no gradient, and the first non-finite step.

Both read the ``StepSignals`` the guarded optimizer step measures anyway (pre-clip norms,
total and per freeze group; a group whose parameters all have ``grad is None`` is absent
from them), so watching costs nothing extra. Under DeepSpeed the framework reports only
the total norm: per-group facts are unknown there and nothing is concluded from them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from vlm_dpo_plugins.freeze.classify import GROUPS, group_of
from vlm_dpo_plugins.freeze.names import named_parameters
from vlm_dpo_plugins.types import Finding, PluginState, Severity, StepSignals

NO_GRADIENT = "no-gradient"
NON_FINITE = "non-finite"


def trainable_groups(model: torch.nn.Module, model_type: str | None) -> set[str]:
    return {group_of(name, model_type) for name, parameter in named_parameters(model) if parameter.requires_grad}


def in_model_order(groups: Iterable[str]) -> list[str]:
    """Vision first, then projector, language, other: the order the forward pass (and an overflow) runs through."""
    wanted = set(groups)
    return [group for group in GROUPS if group in wanted] + sorted(wanted - set(GROUPS))


class GradientWatch:
    """Counts consecutive steps in which trainable groups got no gradient (None) or an all-zero one."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.trainable: set[str] = set()
        self.streaks: dict[str, int] = {}
        self.last_total: float | None = None
        self.last_missing: list[str] = []
        self.last_zero: list[str] = []
        self.steps_seen = 0

    def observe(self, signals: StepSignals) -> None:
        self.steps_seen += 1
        self.last_total = signals.grad_norm
        norms = signals.group_grad_norms
        if signals.grad_norm is not None and not norms:
            self.streaks.clear()  # the framework measured the norm itself (ZeRO): no per-group facts
            self.last_missing, self.last_zero = [], []
            return
        self.last_missing = in_model_order(self.trainable - set(norms))
        self.last_zero = in_model_order(group for group in self.trainable if norms.get(group) == 0.0)
        starved = set(self.last_missing) | set(self.last_zero)
        self.streaks = {group: self.streaks.get(group, 0) + 1 for group in starved}

    @property
    def nothing_receives_gradient(self) -> bool:
        return bool(self.trainable) and set(self.last_missing) | set(self.last_zero) == self.trainable

    def starved_groups(self) -> list[str]:
        """Trainable groups without a usable gradient for at least ``steps`` steps in a row."""
        return in_model_order(group for group, streak in self.streaks.items() if streak >= self.steps)

    def describe(self) -> str:
        if self.steps_seen == 0:
            return "no optimizer step has been measured yet"
        if self.last_total is None:
            return "at the last step no trainable parameter had a gradient (every .grad is None)"
        parts = [f"at the last step the gradient norm was {self.last_total:.3g}"]
        if self.last_missing:
            parts.append(f"trainable group(s) {', '.join(self.last_missing)} had no gradient (.grad is None)")
        if self.last_zero:
            parts.append(f"trainable group(s) {', '.join(self.last_zero)} had an all-zero gradient")
        return "; ".join(parts)

    def state(self) -> PluginState:
        return {"streaks": dict(self.streaks)}

    def load(self, state: Mapping[str, object]) -> None:
        self.streaks = {str(group): int(count) for group, count in dict(state.get("streaks", {})).items()}


class NonFiniteDetector:
    """Reports the first step with a non-finite loss or gradient, naming the first group (in model order) hit."""

    def __init__(self) -> None:
        self.count = 0
        self.reported = False
        self.pending: Finding | None = None

    def observe_step(self, signals: StepSignals, skipped: bool) -> None:
        loss_bad = not math.isfinite(signals.loss)
        norm_bad = signals.grad_norm is not None and not math.isfinite(signals.grad_norm)
        if not (loss_bad or norm_bad):
            return
        self.count += 1
        if not self.reported and self.pending is None:
            # signals.step counts from 0; the Trainer logs that step as step + 1, as the finding must.
            self.pending = non_finite_finding(
                signals.step + 1, signals.loss, signals.grad_norm, signals.group_grad_norms, applied=not skipped
            )

    def observe_log(self, step: int, metrics: Mapping[str, float]) -> Finding | None:
        """The pending step finding, or one read off the logged numbers when no step was watched (a replay)."""
        if self.reported:
            return None
        finding = self.pending
        if finding is None:
            finding = _from_logged(step, metrics)
            if finding is not None:
                self.count += 1
        if finding is not None:
            self.reported, self.pending = True, None
        return finding

    def state(self) -> PluginState:
        return {"count": self.count, "reported": self.reported}

    def load(self, state: Mapping[str, object]) -> None:
        self.count = int(state.get("count", 0))
        self.reported = bool(state.get("reported", False))


GROUP_NORM_PREFIX = "vlm_dpo/grad_norm/"


def _from_logged(step: int, metrics: Mapping[str, float]) -> Finding | None:
    loss = metrics.get("loss")
    norm = metrics.get("vlm_dpo/grad_norm", metrics.get("grad_norm"))
    loss_bad = loss is not None and not math.isfinite(loss)
    norm_bad = norm is not None and not math.isfinite(norm)
    if not (loss_bad or norm_bad):
        return None
    groups = {
        key[len(GROUP_NORM_PREFIX) :]: value for key, value in metrics.items() if key.startswith(GROUP_NORM_PREFIX)
    }
    return non_finite_finding(step, math.nan if loss is None else loss, norm, groups, applied=None)


def non_finite_finding(
    step: int, loss: float, grad_norm: float | None, group_norms: Mapping[str, float], applied: bool | None
) -> Finding:
    bad_groups = in_model_order(group for group, norm in group_norms.items() if not math.isfinite(norm))
    seen = []
    if not math.isfinite(loss):
        seen.append(f"loss {loss}")
    if grad_norm is not None and not math.isfinite(grad_norm):
        seen.append(f"gradient norm {grad_norm}")
    if bad_groups:
        finite = ", ".join(f"{group} {norm:.3g}" for group, norm in group_norms.items() if math.isfinite(norm))
        where = (
            f"; first offending parameter group: {bad_groups[0]}"
            + (f" (also {', '.join(bad_groups[1:])})" if len(bad_groups) > 1 else "")
            + (f"; finite: {finite}" if finite else "")
        )
    elif not math.isfinite(loss):
        where = "; the forward pass already overflowed (the loss itself), before any gradient"
    else:
        where = "; per-group norms not measured here"
    outcome = {
        True: " The step was APPLIED: the weights may now hold NaN/Inf.",
        False: " The step was skipped (weights and optimizer state untouched).",
        None: "",
    }[applied]
    return Finding(
        code=NON_FINITE,
        severity=Severity.ERROR if applied else Severity.WARNING,
        message=f"non-finite values at step {step}: {' and '.join(seen)}{where}.{outcome} Usual cause: a bf16 "
        "overflow in large gradients or log-probabilities (the multimodal stage of Qwen2-VL, high learning rates)",
        fix="keep guards.skip_nonfinite on with guards.max_grad_norm (e.g. 1.0); keep loss.fp32_logps on; under "
        "DeepSpeed lower reduce_bucket_size/allgather_bucket_size (guards.tune_deepspeed_buckets); lower the "
        "learning rate of the group named"
        + (f" ({bad_groups[0]}: guards.group_max_grad_norm.{bad_groups[0]})" if bad_groups else ""),
        source="diagnostics",
        step=step,
    )
