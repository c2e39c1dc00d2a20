"""Built-in stability guards.

The transformers Trainer and TRL never skip a step whose loss or gradient is NaN/Inf,
so one bf16 overflow writes NaN into the weights (and Adam's moments) for good.
These guards measure the pre-clip gradient norm, vote to skip such a step, and
count what happened; the adapter performs the skip and makes the vote agree
across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.errors import TrainingHalted
from vlm_dpo_plugins.guards.settings import GuardsConfig
from vlm_dpo_plugins.markers import hookimpl
from vlm_dpo_plugins.types import PluginState, RunContext, StepSignals


class StabilityGuards:
    def __init__(self) -> None:
        self.config = GuardsConfig()
        self.skipped_steps = 0
        self.consecutive_skips = 0

    @hookimpl
    def vlm_dpo_configure(self, config: VLMDPOConfig) -> None:
        self.config = config.guards

    @hookimpl(trylast=True)
    def vlm_dpo_clip_gradients(self, parameters: list[torch.nn.Parameter], max_norm: float | None) -> float:
        with_grads = [p for p in parameters if p.grad is not None]
        if not with_grads:
            return 0.0
        if max_norm is None:
            return float(torch.nn.utils.get_total_norm([p.grad for p in with_grads]))
        # error_if_nonfinite=False: a non-finite norm is reported and voted on, not raised mid-step.
        return float(torch.nn.utils.clip_grad_norm_(with_grads, max_norm, error_if_nonfinite=False))

    @hookimpl
    def vlm_dpo_skip_step_reason(self, signals: StepSignals) -> str | None:
        if not self.config.skip_nonfinite:
            return None
        if not math.isfinite(signals.loss):
            return f"non-finite loss ({signals.loss})"
        if signals.grad_norm is not None and not math.isfinite(signals.grad_norm):
            return f"non-finite gradient norm ({signals.grad_norm})"
        return None

    @hookimpl
    def vlm_dpo_after_optimizer_step(self, signals: StepSignals, skipped: bool, reasons: Sequence[str]) -> None:
        if not skipped:
            self.consecutive_skips = 0
            return
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.config.max_consecutive_skips:
            raise TrainingHalted(
                f"{self.consecutive_skips} consecutive optimizer steps skipped (last at step {signals.step}: "
                f"{'; '.join(reasons) or 'no reason given'}). Training cannot recover by skipping: lower the "
                "learning rate, keep guards.max_grad_norm set, train in fp32 or check the data for broken pairs; "
                "guards.max_consecutive_skips sets this limit."
            )

    @hookimpl
    def vlm_dpo_metrics(self, step: int) -> Mapping[str, float]:
        return {"vlm_dpo/skipped_steps": float(self.skipped_steps)}

    @hookimpl(trylast=True)
    def vlm_dpo_gradient_checkpointing_kwargs(self, context: RunContext) -> dict[str, Any] | None:
        if not self.config.non_reentrant_checkpointing:
            return None
        # Reentrant checkpointing re-runs frozen/LoRA segments outside autograd's view, which makes
        # DDP see a parameter ready twice ("Expected to mark a variable ready only once").
        return {"use_reentrant": False}

    @hookimpl
    def vlm_dpo_state_dict(self) -> tuple[str, PluginState]:
        return "guards", {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    @hookimpl
    def vlm_dpo_load_state_dict(self, states: Mapping[str, PluginState]) -> None:
        state = states.get("guards")
        if state:
            self.skipped_steps = int(state["skipped_steps"])
            self.consecutive_skips = int(state["consecutive_skips"])
