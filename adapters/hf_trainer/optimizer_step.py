"""The guarded optimizer step inside the transformers Trainer loop (TRL, LLaMA-Factory and ms-swift all run it).

The Trainer calls ``self.optimizer.step()`` once per optimizer step and then steps the
LR scheduler unless ``accelerator.optimizer_step_was_skipped``. Replacing ``step`` on
the prepared (accelerate-wrapped) optimizer puts ``StepGuard.step`` exactly there; a
skipped step is reported through the same ``step_was_skipped`` flag accelerate uses
for fp16 overflow, so the Trainer leaves the schedule where it was, as it does for
its own skips. Nothing else in the loop changes.

Three cases:
- plain torch optimizer: the guard clips (the Trainer's own clipping is off), votes
  across ranks, and steps or skips;
- fp16 with a GradScaler: the gradients are unscaled first, so clipping and the skip
  vote see true values; on a skip the scaler is updated (lower scale), as after its
  own overflow skip;
- DeepSpeed: the engine stepped or skipped inside ``backward``; the guard only
  accounts for what DeepSpeed did (``DeepSpeedStepSkips``), never steps twice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from vlm_dpo_plugins.guards.clipping import ParametersByGroup
from vlm_dpo_plugins.guards.deepspeed_skips import DeepSpeedStepSkips
from vlm_dpo_plugins.guards.step import StepGuard, StepOutcome

logger = logging.getLogger("vlm_dpo_plugins.adapters")


class GuardedOptimizerStep:
    """Owns the losses of the current accumulation window and the step that replaces ``optimizer.step``."""

    def __init__(
        self,
        manager: Any,
        parameters: Callable[[], ParametersByGroup],
        current_step: Callable[[], int],
        save_checkpoint: Callable[[], str | None],
        report_grad_norm: Callable[[float], None] | None = None,
        before_step: Callable[[], None] | None = None,
    ) -> None:
        self.guard = StepGuard(manager)
        self._parameters = parameters
        self._before_step = before_step
        self._current_step = current_step
        self._save_checkpoint = save_checkpoint
        self._report_grad_norm = report_grad_norm
        self._losses: list[torch.Tensor] = []
        self._accelerated: Any = None
        self._original_step: Callable[..., Any] | None = None
        self._deepspeed: DeepSpeedStepSkips | None = None
        self._scaler: Any = None
        self.outcomes: list[StepOutcome] = []

    def install(self, accelerated_optimizer: Any, *, deepspeed_engine: Any = None, scaler: Any = None) -> None:
        if self._accelerated is accelerated_optimizer:
            return  # a second train() call on the same trainer
        self._accelerated = accelerated_optimizer
        self._original_step = accelerated_optimizer.step
        self._deepspeed = DeepSpeedStepSkips(deepspeed_engine) if deepspeed_engine is not None else None
        self._scaler = scaler

        def guarded_step(*args: Any, **kwargs: Any) -> None:
            self.step(*args, **kwargs)

        if hasattr(self._original_step, "_wrapped_by_lr_sched"):
            # torch's LR scheduler marks the step it wraps and warns when the mark is gone; the wrapped step
            # is still what runs for every step taken.
            guarded_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        accelerated_optimizer.step = guarded_step

    def record_loss(self, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def window_loss(self) -> torch.Tensor:
        """This rank's mean loss over the accumulation window; NaN/Inf in any micro-batch carries through."""
        if not self._losses:
            return torch.tensor(0.0)
        return torch.stack([loss.float() for loss in self._losses]).mean()

    def step(self, *args: Any, **kwargs: Any) -> None:
        loss = self.window_loss()
        self._losses.clear()
        step = self._current_step()
        original = self._original_step
        assert original is not None, "install() first"
        if self._before_step is not None:
            self._before_step()  # before the guards measure gradients: a held one is neither clipped nor voted on
        if self._deepspeed is not None:
            original(*args, **kwargs)  # DeepSpeed's wrapper: a no-op, the engine stepped in backward
            outcome = self.guard.step(
                None,
                self._parameters(),
                loss,
                step,
                save_checkpoint=self._save_checkpoint,
                **self._deepspeed.guard_step_arguments(),
            )
        else:
            if self._scaler is not None:
                self._unscale()
            outcome = self.guard.step(
                self._torch_optimizer(),
                self._parameters(),
                loss,
                step,
                step_fn=lambda: original(*args, **kwargs),
                save_checkpoint=self._save_checkpoint,
            )
            if outcome.skipped and self._scaler is not None:
                self._scaler.update()
            if outcome.skipped or self._scaler is None:
                self._accelerated._is_overflow = outcome.skipped
        self.outcomes.append(outcome)
        if self._report_grad_norm is not None:
            self._report_grad_norm(outcome.grad_norms.total if outcome.grad_norms is not None else math.nan)

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self._accelerated, "optimizer", self._accelerated)

    def _unscale(self) -> None:
        # Unscaled here, the scaler's own step does not unscale again, and it still skips on Inf.
        self._scaler.unscale_(self._torch_optimizer())
