"""Reward-margin oscillation: its period and amplitude every log, and a warning when it swamps the progress.

A healthy DPO margin climbs with noise around its trend. A margin that swings up and
down by more than it has gained, flipping direction every few logs, is a run whose
updates undo each other (trainable vision parts, a learning rate too high).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

from vlm_dpo_plugins.diagnostics.series import all_finite, detrended, mean, sign_changes, slope
from vlm_dpo_plugins.types import Finding, PluginState, Severity

CODE = "margin-oscillation"


class MarginOscillationDetector:
    def __init__(self, window: int, min_amplitude: float) -> None:
        self.window = window
        self.min_amplitude = min_amplitude
        self.margins: deque[float] = deque(maxlen=window)
        self.period: float | None = None
        self.amplitude: float | None = None
        self.reported = False

    def observe(self, step: int, metrics: Mapping[str, float]) -> Finding | None:
        margin = metrics.get("rewards/margins")
        if margin is None or not math.isfinite(margin):
            return None
        self.margins.append(float(margin))
        if len(self.margins) < self.window:
            return None
        values = list(self.margins)
        swings = detrended(values)
        changes = sign_changes(swings)
        # Each sign change is half a cycle: the period is in logged steps.
        self.period = 2 * (self.window - 1) / changes if changes else math.inf
        self.amplitude = (max(swings) - min(swings)) / 2
        progress = abs(slope(values)) * (self.window - 1)
        level = abs(mean(values))
        frequent = changes >= self.window // 2
        if self.reported or not (
            frequent
            and self.amplitude >= self.min_amplitude
            and self.amplitude > max(level, progress)
            and all_finite(values)
        ):
            return None
        self.reported = True
        return Finding(
            code=CODE,
            severity=Severity.WARNING,
            message=f"the reward margin oscillates with a period of {self.period:.1f} logged steps and an "
            f"amplitude of {self.amplitude:.3f}, more than its mean {mean(values):.3f} and its trend over the last "
            f"{self.window} logs (to step {step}): updates undo each other instead of separating the responses",
            fix="lower the learning rate; freeze the vision tower and projector (freeze.trainable: [language]); "
            "a larger effective batch (gradient accumulation) smooths the margin",
            source="diagnostics",
            step=step,
        )

    def metrics(self) -> dict[str, float]:
        metrics = {}
        if self.amplitude is not None:
            metrics["vlm_dpo/diag/margin_amplitude"] = self.amplitude
        if self.period is not None and math.isfinite(self.period):  # no sign change: no period to log
            metrics["vlm_dpo/diag/margin_period"] = self.period
        return metrics

    def state(self) -> PluginState:
        return {"margins": list(self.margins), "reported": self.reported}

    def load(self, state: Mapping[str, object]) -> None:
        self.margins = deque((float(value) for value in state.get("margins", [])), maxlen=self.window)
        self.reported = bool(state.get("reported", False))
