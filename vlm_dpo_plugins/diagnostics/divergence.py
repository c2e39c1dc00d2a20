"""The LLaVA DPO failure: the loss rises while reward accuracy stays at a coin flip, rewards moving together.

When the vision tower and projector train with the language model (or the learning rate
is far too high), every update shifts the image features both responses are conditioned
on, so chosen and rejected log-probabilities rise and fall together, the margin learns
nothing and the loss drifts up. The detector looks for all three over a window of
logged steps and names the trainable groups it saw, or the learning rate.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from vlm_dpo_plugins.diagnostics.series import all_finite, correlation, differences, mean, slope
from vlm_dpo_plugins.types import Finding, PluginState, Severity

CODE = "loss-rising-accuracy-chance"
KEYS = ("loss", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "rewards/margins")
MIN_DRIFT = 0.05
"""Rewards this close to 0 are an adapter or a beta that changes nothing (the stall and LoRA detectors' case)."""
VISUAL_PARTS = (("vision", "vision tower"), ("projector", "projector"))
HIGH_FULL_LR = 1e-5
HIGH_LORA_LR = 5e-4


class RisingLossDetector:
    def __init__(self, window: int, rise: float, accuracy_band: float, comovement: float, drift_ratio: float) -> None:
        self.window = window
        self.rise = rise
        self.accuracy_band = accuracy_band
        self.comovement = comovement
        self.drift_ratio = drift_ratio
        self.recent: deque[tuple[float, ...]] = deque(maxlen=window)
        self.peak_learning_rate: float | None = None
        self.reported = False
        self.last_slope: float | None = None
        self.last_comovement: float | None = None

    def observe(
        self, step: int, metrics: Mapping[str, float], trainable: set[str] | None = None, uses_lora: bool = False
    ) -> Finding | None:
        rate = metrics.get("learning_rate")
        if rate is not None:
            self.peak_learning_rate = max(rate, self.peak_learning_rate or rate)
        if any(metrics.get(key) is None for key in KEYS[:2]):
            return None
        self.recent.append(tuple(float(metrics.get(key, float("nan"))) for key in KEYS))
        if len(self.recent) < self.window:
            return None
        losses, accuracies, chosen, rejected, margins = (list(column) for column in zip(*self.recent))
        if not all_finite(losses + accuracies):
            return None  # the non-finite detector speaks for such a window
        half = self.window // 2
        self.last_slope = slope(losses)
        rise = mean(losses[half:]) - mean(losses[:half])
        rewards_known = all_finite(chosen + rejected + margins)
        self.last_comovement = correlation(differences(chosen), differences(rejected)) if rewards_known else None
        # Both rewards drifting far more than their difference: the shared (image) context moved, not the preference.
        drift = mean([(abs(c) + abs(r)) / 2 for c, r in zip(chosen, rejected)]) if rewards_known else None
        margin = mean([abs(m) for m in margins]) if rewards_known else None
        together = rewards_known and (
            self.last_comovement is not None
            and self.last_comovement >= self.comovement
            and drift >= max(MIN_DRIFT, self.drift_ratio * margin)
        )
        at_chance = abs(mean(accuracies) - 0.5) <= self.accuracy_band
        if self.reported or not (self.last_slope > 0 and rise > self.rise and at_chance and together):
            return None
        self.reported = True
        cause, fix = self._explain(trainable, uses_lora)
        moved = (
            f"; chosen and rejected rewards move together (correlation of their step changes "
            f"{self.last_comovement:.2f}; mean |reward| {drift:.3f} against a mean |margin| of {margin:.4f})"
        )
        return Finding(
            code=CODE,
            severity=Severity.WARNING,
            message=f"over the last {self.window} logged steps (to step {step}) the loss rose by {rise:.4f} "
            f"({losses[0]:.4f} -> {losses[-1]:.4f}) while reward accuracy stayed near chance (mean "
            f"{mean(accuracies):.2f}){moved}: the policy is not learning the preference. {cause}",
            fix=fix,
            source="diagnostics",
            step=step,
        )

    def _explain(self, trainable: set[str] | None, uses_lora: bool) -> tuple[str, str]:
        rate = self.peak_learning_rate
        shown_rate = f"{rate:.3g}" if rate is not None else "unknown"
        visual = [name for group, name in VISUAL_PARTS if group in (trainable or set())]
        if visual:
            return (
                f"Likely cause: the {' and '.join(visual)} {'is' if len(visual) == 1 else 'are'} trainable: each "
                "update shifts the image features both responses are conditioned on (learning rate "
                f"{shown_rate})",
                "freeze the vision tower and projector (freeze.trainable: [language], the default; LLaMA-Factory "
                "freeze_vision_tower/freeze_multi_modal_projector: true; ms-swift --freeze_vit/--freeze_aligner "
                "true); unfreeze later with freeze.unfreeze stages at a lower rate if wanted",
            )
        limit = HIGH_LORA_LR if uses_lora else HIGH_FULL_LR
        known = trainable is not None
        if rate is not None and rate > limit:
            return (
                f"Likely cause: the learning rate {shown_rate} is too high for DPO"
                + ("" if known else " (or the vision tower/projector are trainable: this log does not say)"),
                f"lower the learning rate ({'~5e-5..2e-4 with LoRA' if uses_lora else '~5e-7..5e-6 for full DPO'})"
                + ("" if known else "; freeze the vision tower and projector"),
            )
        return (
            "Likely cause: the vision tower/projector trainable, or a learning rate too high "
            f"(learning rate {shown_rate})",
            "freeze the vision tower and projector (freeze.trainable: [language]) and lower the learning rate",
        )

    def metrics(self) -> dict[str, float]:
        metrics = {}
        if self.last_slope is not None:
            metrics["vlm_dpo/diag/loss_slope"] = self.last_slope
        if self.last_comovement is not None:
            metrics["vlm_dpo/diag/reward_comovement"] = self.last_comovement
        return metrics

    def state(self) -> PluginState:
        return {
            "recent": [list(row) for row in self.recent],
            "peak": self.peak_learning_rate,
            "reported": self.reported,
        }

    def load(self, state: Mapping[str, object]) -> None:
        self.recent = deque((tuple(row) for row in state.get("recent", [])), maxlen=self.window)
        peak = state.get("peak")
        self.peak_learning_rate = None if peak is None else float(peak)
        self.reported = bool(state.get("reported", False))
