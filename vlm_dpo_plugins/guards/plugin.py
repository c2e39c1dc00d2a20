"""Built-in stability guards.

The transformers Trainer and TRL never skip a step whose loss or gradient is NaN/Inf,
so one bf16 overflow writes NaN into the weights (and Adam's moments) for good.
These guards clip and measure the gradients per group, vote to skip such a step,
count skips and loss spikes, back the learning rate off after either, halt after too
many skips in a row, and choose checkpointing settings that DDP accepts. The step
itself is taken or skipped by ``guards.step.StepGuard``, which the adapters call.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.distributed import rank
from vlm_dpo_plugins.errors import TrainingHalted
from vlm_dpo_plugins.guards.backoff import LearningRateBackoff
from vlm_dpo_plugins.guards.checkpointing import CheckpointingPlan, checkpointing_plan
from vlm_dpo_plugins.guards.clipping import clip_grad_norms, norm_after_clipping
from vlm_dpo_plugins.guards.settings import GuardsConfig
from vlm_dpo_plugins.guards.spikes import LossSpikeDetector
from vlm_dpo_plugins.markers import hookimpl
from vlm_dpo_plugins.types import GradNorms, PluginState, RunContext, StepSignals

logger = logging.getLogger("vlm_dpo_plugins.guards")

LIKELY_CAUSES = (
    "Likely causes: a learning rate too high for bf16 (lower it, or set guards.lr_backoff_factor); one parameter "
    "group exploding (compare vlm_dpo/grad_norm/<group>; keep guards.max_grad_norm set, use "
    "guards.group_max_grad_norm or freeze that group); logits overflowing in half precision (loss.fp32_logps: true, "
    "or train in fp32); broken pairs in the data (enable the collation checks); for DeepSpeed, oversized "
    "communication buckets. guards.max_consecutive_skips sets this limit."
)


class StabilityGuards:
    @hookimpl
    def vlm_dpo_config_sections(self) -> Mapping[str, type]:
        return {"guards": GuardsConfig}

    def __init__(self) -> None:
        self.configure(GuardsConfig())
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def configure(self, config: GuardsConfig) -> None:
        self.config = config
        self.spikes = LossSpikeDetector(config.spike_window, config.spike_factor)
        self.backoff = LearningRateBackoff(config.lr_backoff_factor, config.lr_backoff_steps)
        self.last_norms = GradNorms(total=math.nan)
        self.applied_scale = 1.0
        self.last_step_spiked = False
        self.frozen_groups = False

    @hookimpl
    def vlm_dpo_configure(self, config: VLMDPOConfig) -> None:
        self.configure(config.guards)
        freeze = config.section("freeze")
        # With the freeze policy blocked nothing is known to be frozen but what PEFT freezes (RunContext.uses_peft).
        self.frozen_groups = freeze is not None and not {"vision", "projector", "language"} <= set(freeze.trainable)

    # -- clipping and the skip vote ------------------------------------------

    @hookimpl(trylast=True)
    def vlm_dpo_clip_gradients(self, parameters: Mapping[str, Sequence[torch.nn.Parameter]]) -> GradNorms | None:
        return clip_grad_norms(parameters, self.config.max_grad_norm, self.config.group_max_grad_norm)

    @hookimpl
    def vlm_dpo_skip_step_reason(self, signals: StepSignals) -> str | None:
        if not self.config.skip_nonfinite:
            return None
        if not math.isfinite(signals.loss):
            return f"non-finite loss ({signals.loss})"
        if signals.grad_norm is not None and not math.isfinite(signals.grad_norm):
            groups = [group for group, norm in signals.group_grad_norms.items() if not math.isfinite(norm)]
            where = f" in group(s) {', '.join(groups)}" if groups else ""
            return f"non-finite gradient norm ({signals.grad_norm}){where}"
        if self.config.skip_spikes and self.spikes.is_spike(signals.loss):
            return (
                f"loss spike ({signals.loss:.4g} > {self.config.spike_factor:g} x the median {self.spikes.median:.4g} "
                f"of the previous {len(self.spikes.recent)} losses)"
            )
        return None

    @hookimpl(trylast=True)
    def vlm_dpo_learning_rate_scale(self, step: int) -> float:
        return self.backoff.scale

    @hookimpl
    def vlm_dpo_after_optimizer_step(self, signals: StepSignals, skipped: bool, reasons: Sequence[str]) -> None:
        # Logged as what the last step used, whichever plugin decided it (another plugin's answer comes first).
        self.applied_scale = signals.learning_rate_scale
        self.last_norms = GradNorms(
            total=math.nan if signals.grad_norm is None else signals.grad_norm, groups=dict(signals.group_grad_norms)
        )
        median, window = self.spikes.median, len(self.spikes.recent)
        self.last_step_spiked = self.spikes.observe(signals.loss)
        if self.last_step_spiked:
            self._log(
                "step %d: loss spike, %.4g > %g x the median %.4g of the previous %d losses%s",
                signals.step, signals.loss, self.config.spike_factor, median, window,
                "; learning rate backed off" if self._backs_off("spike") else "",
            )
        if skipped:
            self._record_skip(signals, reasons)
            return
        self.consecutive_skips = 0
        self.backoff.step_taken()
        if self.last_step_spiked and self._backs_off("spike"):
            self.backoff.trigger()

    def _record_skip(self, signals: StepSignals, reasons: Sequence[str]) -> None:
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self._backs_off("skip"):
            self.backoff.trigger()
        explanation = "; ".join(reasons) or "no reason given"
        if self.consecutive_skips >= self.config.max_consecutive_skips:
            raise TrainingHalted(
                f"{self.consecutive_skips} consecutive optimizer steps skipped (last at step {signals.step}: "
                f"{explanation}). Training cannot recover by skipping. {LIKELY_CAUSES}"
            )
        self._log(
            "step %d: optimizer step skipped on every rank (%s); weights, optimizer state and learning-rate schedule "
            "unchanged (%d skipped, %d in a row, halt at %d)",
            signals.step, explanation, self.skipped_steps, self.consecutive_skips, self.config.max_consecutive_skips,
        )

    def _backs_off(self, trigger: str) -> bool:
        return self.config.lr_backoff_factor is not None and trigger in self.config.lr_backoff_on

    @staticmethod
    def _log(message: str, *args: Any) -> None:
        if rank() == 0:  # the decision is the same on every rank: one line, not one per rank
            logger.warning(message, *args)

    # -- metrics and state ---------------------------------------------------

    @hookimpl
    def vlm_dpo_metrics(self, step: int) -> Mapping[str, float]:
        metrics = {
            "vlm_dpo/skipped_steps": float(self.skipped_steps),
            "vlm_dpo/loss_spikes": float(self.spikes.spikes),
            "vlm_dpo/lr_scale": self.applied_scale,
        }
        if not math.isnan(self.last_norms.total):
            metrics["vlm_dpo/grad_norm"] = self.last_norms.total
            metrics["vlm_dpo/grad_norm_clipped"] = norm_after_clipping(
                self.last_norms, self.config.max_grad_norm, self.config.group_max_grad_norm
            )
        metrics.update({f"vlm_dpo/grad_norm/{group}": norm for group, norm in self.last_norms.groups.items()})
        return metrics

    @hookimpl
    def vlm_dpo_state_dict(self) -> tuple[str, PluginState]:
        return "guards", {
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "spikes": self.spikes.state_dict(),
            "backoff": self.backoff.state_dict(),
        }

    @hookimpl
    def vlm_dpo_load_state_dict(self, states: Mapping[str, PluginState]) -> None:
        state = states.get("guards")
        if state:
            self.skipped_steps = int(state["skipped_steps"])
            self.consecutive_skips = int(state["consecutive_skips"])
            self.spikes.load_state_dict(state["spikes"])
            self.backoff.load_state_dict(state["backoff"])

    # -- checkpointing and DDP -----------------------------------------------

    def checkpointing_plan(self, context: RunContext) -> CheckpointingPlan:
        return checkpointing_plan(
            context,
            frozen_parameters=self.frozen_groups,
            prefer_non_reentrant=self.config.non_reentrant_checkpointing,
        )

    @hookimpl(trylast=True)
    def vlm_dpo_gradient_checkpointing_kwargs(self, context: RunContext) -> dict[str, Any]:
        plan = self.checkpointing_plan(context)
        logger.info("gradient checkpointing %s: %s", plan.gradient_checkpointing_kwargs, plan.reason)
        return plan.gradient_checkpointing_kwargs

    @hookimpl(trylast=True)
    def vlm_dpo_ddp_kwargs(self, context: RunContext) -> dict[str, Any]:
        return self.checkpointing_plan(context).ddp_kwargs
