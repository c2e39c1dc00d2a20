"""Built-in detector: a loss pinned at ln 2 with zero reward margins means nothing is training."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.diagnostics.settings import DiagnosticsConfig
from vlm_dpo_plugins.markers import hookimpl
from vlm_dpo_plugins.types import Finding, PluginState, Severity

LN2 = math.log(2)


class Diagnostics:
    def __init__(self) -> None:
        self.config = DiagnosticsConfig()
        self.stalled_logs = 0
        self.warned: set[str] = set()

    @hookimpl
    def vlm_dpo_configure(self, config: VLMDPOConfig) -> None:
        self.config = config.diagnostics

    @hookimpl
    def vlm_dpo_on_log(self, step: int, metrics: Mapping[str, float]) -> Sequence[Finding]:
        if not self.config.enabled or "loss" not in metrics:
            return []
        margin = metrics.get("rewards/margins", 0.0)
        tolerance = self.config.stall_tolerance
        if abs(metrics["loss"] - LN2) < tolerance and abs(margin) < tolerance:
            self.stalled_logs += 1
        else:
            self.stalled_logs = 0
        if self.stalled_logs >= self.config.stall_steps and "loss-stuck-at-ln2" not in self.warned:
            self.warned.add("loss-stuck-at-ln2")
            return [
                Finding(
                    code="loss-stuck-at-ln2",
                    severity=Severity.WARNING,
                    message=(
                        f"loss has stayed at ln 2 = {LN2:.4f} with reward margins ~0 for {self.stalled_logs} "
                        f"logged steps (step {step}): the policy is not moving away from the reference"
                    ),
                    fix=(
                        "check for identical chosen/rejected pairs, a label mask covering a whole response, "
                        "beta, and that trainable parameters receive gradients"
                    ),
                    source="diagnostics",
                )
            ]
        return []

    @hookimpl
    def vlm_dpo_state_dict(self) -> tuple[str, PluginState]:
        return "diagnostics", {"stalled_logs": self.stalled_logs, "warned": sorted(self.warned)}

    @hookimpl
    def vlm_dpo_load_state_dict(self, states: Mapping[str, PluginState]) -> None:
        state = states.get("diagnostics")
        if state:
            self.stalled_logs = int(state["stalled_logs"])
            self.warned = set(state["warned"])
