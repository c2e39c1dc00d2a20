"""The built-in detectors, fed by the logged metrics, the guarded optimizer step and the training batches.

Each reports its cause once, as a ``Finding`` with the fix, and logs its measurement as a
``vlm_dpo/diag/*`` metric. Only the metric-stream detectors (ln 2 stall, rising loss,
margin oscillation, non-finite values) can also run on a finished run's log
(:mod:`vlm_dpo_plugins.diagnostics.replay`); the others need the live model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.diagnostics.batch import BATCH_KEYS, BatchFacts, batch_facts
from vlm_dpo_plugins.diagnostics.divergence import RisingLossDetector
from vlm_dpo_plugins.diagnostics.gradients import GradientWatch, NonFiniteDetector, trainable_groups
from vlm_dpo_plugins.diagnostics.lora import LoraInertDetector
from vlm_dpo_plugins.diagnostics.oscillation import MarginOscillationDetector
from vlm_dpo_plugins.diagnostics.settings import DiagnosticsConfig
from vlm_dpo_plugins.diagnostics.stall import NothingTrainsDetector
from vlm_dpo_plugins.markers import hookimpl
from vlm_dpo_plugins.types import Finding, PluginState, RunContext, StepSignals


class Diagnostics:
    @hookimpl
    def vlm_dpo_config_sections(self) -> Mapping[str, type]:
        return {"diagnostics": DiagnosticsConfig}

    def __init__(self) -> None:
        self.beta: float | None = None
        self.model_type: str | None = None
        self.unfreeze_steps: frozenset[int] = frozenset()
        self.trainable: set[str] | None = None
        self.last_batch: tuple[Mapping[str, Any], int] | None = None
        self.set_up(DiagnosticsConfig())

    def set_up(self, config: DiagnosticsConfig) -> None:
        self.config = config
        self.lora = LoraInertDetector(config.lora_inert_steps, config.lora_inert_tolerance)
        self.nothing_trains = NothingTrainsDetector(config.stall_steps, config.stall_tolerance)
        self.gradients = GradientWatch(config.no_gradient_steps)
        self.non_finite = NonFiniteDetector()
        self.rising = RisingLossDetector(
            config.trend_steps,
            config.trend_rise,
            config.accuracy_band,
            config.reward_comovement,
            config.reward_drift_ratio,
        )
        self.oscillation = MarginOscillationDetector(config.oscillation_steps, config.oscillation_min_amplitude)

    @property
    def stalled_logs(self) -> int:
        return self.nothing_trains.stalled_logs

    @hookimpl
    def vlm_dpo_configure(self, config: VLMDPOConfig) -> None:
        self.set_up(config.diagnostics)
        loss, freeze = config.section("loss"), config.section("freeze")
        self.beta = loss.beta if loss is not None else self.beta
        stages = freeze.unfreeze if freeze is not None else ()
        self.unfreeze_steps = frozenset(stage.at_step for stage in stages)

    @hookimpl
    def vlm_dpo_train_begin(self, model: torch.nn.Module, context: RunContext) -> None:
        if not self.config.enabled:
            return
        self.model_type = context.model_type
        self.lora.watch(model, uses_peft=context.uses_peft)
        self._watch_trainable(model)

    @hookimpl
    def vlm_dpo_step_begin(self, step: int, model: torch.nn.Module) -> None:
        # Only a progressive-unfreeze stage changes which groups train; classifying every name each step would not.
        if self.config.enabled and step in self.unfreeze_steps:
            self._watch_trainable(model)

    def _watch_trainable(self, model: torch.nn.Module) -> None:
        self.trainable = trainable_groups(model, self.model_type)
        self.gradients.trainable = set(self.trainable)

    @hookimpl
    def vlm_dpo_check_batch(self, batch: Mapping[str, torch.Tensor], step: int) -> Sequence[Finding]:
        # Only the token tensors, so pixel_values are not held past their step; looked into only to explain a stall.
        self.last_batch = ({key: batch[key] for key in BATCH_KEYS if key in batch}, step)
        return []

    def _look_at_last_batch(self) -> BatchFacts | None:
        return batch_facts(*self.last_batch) if self.last_batch is not None else None

    @hookimpl
    def vlm_dpo_after_optimizer_step(self, signals: StepSignals, skipped: bool, reasons: Sequence[str]) -> None:
        if self.config.enabled:
            self.gradients.observe(signals)
            self.non_finite.observe_step(signals, skipped)

    @hookimpl
    def vlm_dpo_on_log(self, step: int, metrics: Mapping[str, float]) -> Sequence[Finding]:
        if not self.config.enabled:
            return []
        findings = [self.non_finite.observe_log(step, metrics)]
        if "loss" in metrics:
            findings.append(self.lora.observe(step, metrics))
        if not self.lora.reported:  # an inert adapter already names why nothing trains
            findings.append(
                self.nothing_trains.observe(step, metrics, self.gradients, self._look_at_last_batch, self.beta)
            )
        if "loss" in metrics:
            findings.append(self.rising.observe(step, metrics, self.trainable, self.lora.active))
            findings.append(self.oscillation.observe(step, metrics))
        return [finding for finding in findings if finding is not None]

    @hookimpl
    def vlm_dpo_metrics(self, step: int) -> Mapping[str, float]:
        if not self.config.enabled:
            return {}
        return {
            "vlm_dpo/diag/ln2_streak": float(self.nothing_trains.stalled_logs),
            "vlm_dpo/diag/non_finite_steps": float(self.non_finite.count),
            **({"vlm_dpo/diag/lora_inert_streak": float(self.lora.inert_logs)} if self.lora.active else {}),
            **self.rising.metrics(),
            **self.oscillation.metrics(),
        }

    @hookimpl
    def vlm_dpo_state_dict(self) -> tuple[str, PluginState]:
        return "diagnostics", {
            "nothing_trains": self.nothing_trains.state(),
            "gradients": self.gradients.state(),
            "non_finite": self.non_finite.state(),
            "rising": self.rising.state(),
            "oscillation": self.oscillation.state(),
            "lora_inert": self.lora.state(),
        }

    @hookimpl
    def vlm_dpo_load_state_dict(self, states: Mapping[str, PluginState]) -> None:
        state = states.get("diagnostics")
        if not state:
            return
        self.nothing_trains.load(state.get("nothing_trains", _older_stall_state(state)))
        self.gradients.load(state.get("gradients", {}))
        self.non_finite.load(state.get("non_finite", {}))
        self.rising.load(state.get("rising", {}))
        self.oscillation.load(state.get("oscillation", {}))
        self.lora.load(state.get("lora_inert", {}))


def _older_stall_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Checkpoints written before the detectors were split kept the stall count at the top level."""
    return {
        "stalled_logs": state.get("stalled_logs", 0),
        "reported": "loss-stuck-at-ln2" in state.get("warned", ()),
    }
