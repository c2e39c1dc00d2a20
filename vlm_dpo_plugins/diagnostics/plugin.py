"""Built-in detectors: a loss pinned at ln 2 with zero reward margins, and a LoRA adapter with no effect."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.diagnostics.lora import CODE as LORA_INERT
from vlm_dpo_plugins.diagnostics.lora import LoraInertDetector
from vlm_dpo_plugins.diagnostics.settings import DiagnosticsConfig
from vlm_dpo_plugins.markers import hookimpl
from vlm_dpo_plugins.types import Finding, PluginState, RunContext, Severity

LN2 = math.log(2)
LN2_STALL = "loss-stuck-at-ln2"


class Diagnostics:
    def __init__(self) -> None:
        self.config = DiagnosticsConfig()
        self.stalled_logs = 0
        self.warned: set[str] = set()
        self.lora = self._lora_detector()

    def _lora_detector(self) -> LoraInertDetector:
        return LoraInertDetector(self.config.lora_inert_steps, self.config.lora_inert_tolerance)

    @hookimpl
    def vlm_dpo_configure(self, config: VLMDPOConfig) -> None:
        self.config = config.diagnostics
        self.lora.steps = self.config.lora_inert_steps
        self.lora.tolerance = self.config.lora_inert_tolerance

    @hookimpl
    def vlm_dpo_train_begin(self, model: torch.nn.Module, context: RunContext) -> None:
        if self.config.enabled:
            self.lora.watch(model, uses_peft=context.uses_peft)

    @hookimpl
    def vlm_dpo_on_log(self, step: int, metrics: Mapping[str, float]) -> Sequence[Finding]:
        if not self.config.enabled or "loss" not in metrics:
            return []
        findings = []
        lora_inert = self.lora.observe(step, metrics)
        if lora_inert is not None:
            self.warned.add(LORA_INERT)
            findings.append(lora_inert)
        stall = self._ln2_stall(step, metrics)
        if stall is not None:
            findings.append(stall)
        return findings

    def _ln2_stall(self, step: int, metrics: Mapping[str, float]) -> Finding | None:
        margin = metrics.get("rewards/margins", 0.0)
        tolerance = self.config.stall_tolerance
        if abs(metrics["loss"] - LN2) < tolerance and abs(margin) < tolerance:
            self.stalled_logs += 1
        else:
            self.stalled_logs = 0
        # An inert LoRA adapter already names why nothing trains; its generic check-list would only mislead.
        if self.stalled_logs < self.config.stall_steps or self.warned & {LN2_STALL, LORA_INERT}:
            return None
        self.warned.add(LN2_STALL)
        return Finding(
            code=LN2_STALL,
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

    @hookimpl
    def vlm_dpo_state_dict(self) -> tuple[str, PluginState]:
        return "diagnostics", {
            "stalled_logs": self.stalled_logs,
            "warned": sorted(self.warned),
            "lora_inert": self.lora.state(),
        }

    @hookimpl
    def vlm_dpo_load_state_dict(self, states: Mapping[str, PluginState]) -> None:
        state = states.get("diagnostics")
        if state:
            self.stalled_logs = int(state["stalled_logs"])
            self.warned = set(state["warned"])
            self.lora.load(state.get("lora_inert", {}))
