"""The optimizer step under the guards: the one call an adapter makes in place of ``optimizer.step()``.

Neither transformers' Trainer nor TRL, LLaMA-Factory or ms-swift skips a step whose
loss or gradient is NaN/Inf: one bf16 overflow writes NaN into the weights and
Adam's moments for good. ``StepGuard.step`` measures and clips the gradients per
group, asks the skip hooks, makes every rank agree, and then either steps (optimizer,
then scheduler, under any learning-rate back-off) or skips. A skipped step leaves
parameters, optimizer state and schedule exactly as they were and clears the
gradients, so the bad batch cannot leak into the next accumulation.

Under DeepSpeed ZeRO the engine steps and skips by itself; the adapter then passes
``framework_skipped`` and the guard only accounts for the step, never stepping again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vlm_dpo_plugins.distributed import gather_from_ranks, max_across_ranks
from vlm_dpo_plugins.errors import TrainingHalted
from vlm_dpo_plugins.guards.backoff import scaled_learning_rates
from vlm_dpo_plugins.guards.clipping import ParametersByGroup, measure_grad_norms
from vlm_dpo_plugins.types import GradNorms, StepSignals

logger = logging.getLogger("vlm_dpo_plugins.guards")

FRAMEWORK_SKIP_REASON = "skipped by the framework's own overflow check (DeepSpeed ZeRO: 'OVERFLOW! Skipping step')"

SaveCheckpoint = Callable[[], "str | None"]
"""Saves a checkpoint the usual way for the framework and returns where (or None); called on every rank."""


@dataclass(frozen=True)
class StepOutcome:
    step: int
    skipped: bool
    reasons: tuple[str, ...] = ()
    """Why it was skipped, each prefixed with the rank that saw it in distributed runs."""
    grad_norms: GradNorms | None = None
    learning_rate_scale: float = 1.0


class StepGuard:
    """Wraps each optimizer step of one training run; create it from that run's plugin manager."""

    def __init__(self, manager: Any) -> None:
        self.hook = manager.hook
        self._warned_backoff_unavailable = False

    def step(
        self,
        optimizer: torch.optim.Optimizer | None,
        parameters: ParametersByGroup | None,
        loss: float | torch.Tensor,
        step: int,
        *,
        scheduler: Any = None,
        step_fn: Callable[[], Any] | None = None,
        framework_skipped: bool | None = None,
        framework_reason: str | None = None,
        grad_norm: float | None = None,
        save_checkpoint: SaveCheckpoint | None = None,
    ) -> StepOutcome:
        """Take or skip optimizer step ``step``; call on every rank, after backward and before zeroing gradients.

        ``parameters``: the trainable parameters by group (``clipping.parameters_by_group``).
        ``loss``: this step's loss on this rank. ``scheduler``: stepped after a taken step; leave it None
        if the framework steps it, and let it do so only when ``skipped`` is false. ``step_fn``: what
        actually updates the weights (default ``optimizer.step``), e.g. the framework's own wrapper.
        ``framework_skipped``: None where the guard performs the step; True/False where the framework
        (DeepSpeed ZeRO) already skipped/took it, with ``framework_reason`` and its ``grad_norm``.
        ``save_checkpoint``: called before ``TrainingHalted`` is raised after too many skips in a row.
        """
        loss_value = float(loss.detach().float().item()) if isinstance(loss, torch.Tensor) else float(loss)
        if framework_skipped is None and optimizer is None:
            raise ValueError(
                "StepGuard.step needs the optimizer when it takes the step itself; pass framework_skipped=True/False "
                "where the framework (DeepSpeed) has already stepped or skipped"
            )
        if framework_skipped is not None:
            return self._account_for_framework_step(
                optimizer, parameters, loss_value, step, framework_skipped, framework_reason, grad_norm, save_checkpoint
            )
        norms = self.hook.vlm_dpo_clip_gradients(parameters=parameters or {})
        signals = _signals(step, loss_value, norms, optimizer)
        local_reasons = [reason for reason in self.hook.vlm_dpo_skip_step_reason(signals=signals) if reason]
        # Each plugin's answer is checked where it returns (plugin_calls: finite, 0 < scale <= 1, else a
        # PluginError naming the plugin), so by here nothing has been changed yet and any scale is safe to apply.
        scale = self.hook.vlm_dpo_learning_rate_scale(step=step)
        # One collective for both: any rank's skip skips everywhere, and the smallest scale applies everywhere,
        # since ranks that step with different learning rates drift apart.
        skip_vote, negated_scale = max_across_ranks([1.0 if local_reasons else 0.0, -(1.0 if scale is None else scale)])
        skipped, scale = skip_vote > 0, -negated_scale
        reasons: tuple[str, ...] = ()
        applied = 1.0
        if skipped:
            reasons = _reasons_from_every_rank(local_reasons)
            _clear_gradients(optimizer, parameters)
        else:
            with scaled_learning_rates(optimizer, scale):
                (step_fn or optimizer.step)()
            applied = scale
            if scheduler is not None:
                scheduler.step()
        self._after_step(dataclasses.replace(signals, learning_rate_scale=applied), skipped, reasons, save_checkpoint)
        return StepOutcome(step, skipped, reasons, norms, applied)

    def _account_for_framework_step(
        self,
        optimizer: torch.optim.Optimizer | None,
        parameters: ParametersByGroup | None,
        loss: float,
        step: int,
        skipped: bool,
        reason: str | None,
        grad_norm: float | None,
        save_checkpoint: SaveCheckpoint | None,
    ) -> StepOutcome:
        # ZeRO keeps gradients in its own partitions, so the framework's norm is used when it reports one.
        norms = GradNorms(total=grad_norm) if grad_norm is not None else measure_grad_norms(parameters or {})
        signals = _signals(step, loss, norms, optimizer)
        reasons: tuple[str, ...] = (reason or FRAMEWORK_SKIP_REASON,) if skipped else ()
        if not skipped:
            objections = [reason for reason in self.hook.vlm_dpo_skip_step_reason(signals=signals) if reason]
            if objections:
                logger.warning(
                    "step %d: the framework applied this optimizer step although %s; check the weights for "
                    "NaN/Inf (its own overflow check may be off, e.g. DeepSpeed check_grad_overflow=false)",
                    step, "; ".join(objections),
                )
            scale = self.hook.vlm_dpo_learning_rate_scale(step=step)
            if scale not in (None, 1.0) and not self._warned_backoff_unavailable:
                self._warned_backoff_unavailable = True
                logger.warning(
                    "guards.lr_backoff_factor has no effect here: the framework takes the optimizer step itself"
                )
        self._after_step(signals, skipped, reasons, save_checkpoint)
        return StepOutcome(step, skipped, reasons, norms)

    def _after_step(
        self, signals: StepSignals, skipped: bool, reasons: tuple[str, ...], save_checkpoint: SaveCheckpoint | None
    ) -> None:
        try:
            self.hook.vlm_dpo_after_optimizer_step(signals=signals, skipped=skipped, reasons=list(reasons))
        except TrainingHalted as halt:
            if save_checkpoint is None:
                raise
            raise _halted_after_saving(halt, save_checkpoint) from halt


def _signals(step: int, loss: float, norms: GradNorms | None, optimizer: torch.optim.Optimizer | None) -> StepSignals:
    learning_rate = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None
    return StepSignals(
        step=step,
        loss=loss,
        grad_norm=norms.total if norms is not None else None,
        learning_rate=learning_rate,
        group_grad_norms=dict(norms.groups) if norms is not None else {},
    )


def _reasons_from_every_rank(local_reasons: list[str]) -> tuple[str, ...]:
    per_rank = gather_from_ranks(local_reasons)
    if len(per_rank) == 1:
        return tuple(local_reasons)
    return tuple(f"rank {rank}: {reason}" for rank, reasons in enumerate(per_rank) for reason in reasons)


def _clear_gradients(optimizer: torch.optim.Optimizer | None, parameters: ParametersByGroup | None) -> None:
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    for group in (parameters or {}).values():
        for parameter in group:
            parameter.grad = None


def _halted_after_saving(halt: TrainingHalted, save_checkpoint: SaveCheckpoint) -> TrainingHalted:
    try:
        where = save_checkpoint()
    except Exception as error:  # the halt matters more than the failed save; report both
        return TrainingHalted(f"{halt} Saving a checkpoint before stopping failed too: {error!r}.")
    location = f" to {where}" if where else ""
    return TrainingHalted(
        f"{halt} A checkpoint was saved{location}: it holds the weights of the last step taken, "
        "since the skipped steps changed nothing."
    )
