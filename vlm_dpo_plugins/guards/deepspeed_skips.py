"""Whether DeepSpeed itself skipped an optimizer step, read from the engine by duck typing (no deepspeed import).

Under ZeRO, ``engine.step()`` checks the gradients and, when their norm is NaN/Inf,
discards the step on every rank: weights, optimizer state and the LR scheduler stay
as they were, ``engine.skipped_steps`` grows by one, the ZeRO optimizer's ``overflow``
flag is set and ``engine.get_global_grad_norm()`` reports ``inf``. The Trainer's own
step counter still advances. An adapter that missed this would either count nothing
(the guards' consecutive-skip limit never triggers) or skip again itself; with
:class:`DeepSpeedStepSkips` it reports the step as skipped by the framework instead.

Read from DeepSpeed 0.19 (``runtime/engine.py`` ``_take_model_step``,
``runtime/zero/stage_1_and_2.py`` and ``stage3.py`` ``step``).
"""

from __future__ import annotations

from typing import Any

import torch


class DeepSpeedStepSkips:
    """Counts the optimizer steps DeepSpeed discarded since the last check.

    Create it after the engine is built and after any checkpoint is loaded (loading
    restores ``skipped_steps`` from the checkpoint); call :meth:`skipped_since_last_check`
    after each optimizer step, i.e. after ``engine.step()`` at a gradient-accumulation
    boundary.
    """

    def __init__(self, engine: Any) -> None:
        self._engine = find_deepspeed_engine(engine)
        self._seen = self._engine.skipped_steps

    def skipped_since_last_check(self) -> int:
        count = self._engine.skipped_steps
        # A checkpoint loaded since the last check can lower the counter: resynchronise instead of going negative.
        new = max(count - self._seen, 0)
        self._seen = count
        return new

    def guard_step_arguments(self) -> dict[str, Any]:
        """``framework_skipped``, ``framework_reason`` and ``grad_norm`` for ``StepGuard.step`` after a step."""
        skipped = self.skipped_since_last_check() > 0
        return {
            "framework_skipped": skipped,
            "framework_reason": self.reason() if skipped else None,
            "grad_norm": self.grad_norm(),
        }

    def grad_norm(self) -> float | None:
        """The global gradient norm DeepSpeed measured at the last step (``inf`` when it skipped), or None."""
        get_norm = getattr(self._engine, "get_global_grad_norm", None)
        norm = get_norm() if callable(get_norm) else None
        return None if norm is None else float(norm)

    def reason(self) -> str:
        """Why DeepSpeed skips a step, for the guards' skip log."""
        fp16_enabled = getattr(self._engine, "fp16_enabled", None)
        if callable(fp16_enabled) and fp16_enabled():
            scale = getattr(getattr(self._engine, "optimizer", None), "loss_scale", None)
            return f"DeepSpeed fp16 loss-scale overflow (loss scale now {scale}); skipped by DeepSpeed"
        return "non-finite gradient norm; skipped by DeepSpeed"


def find_deepspeed_engine(candidate: Any) -> Any:
    """The DeepSpeed engine itself, or the one inside a wrapper with an ``engine`` attribute (accelerate's)."""
    for obj in (candidate, getattr(candidate, "engine", None)):
        if isinstance(getattr(obj, "skipped_steps", None), int):
            return obj
    raise TypeError(
        f"{type(candidate).__name__} is not a DeepSpeed engine (it has no integer 'skipped_steps'); pass the engine "
        "itself, e.g. trainer.model_wrapped or accelerator.deepspeed_engine_wrapped.engine"
    )


def deepspeed_skips_nonfinite_steps(engine: Any) -> bool:
    """Whether this engine's optimizer discards a step with NaN/Inf gradients by itself.

    False means DeepSpeed applies whatever the gradients hold, and a NaN reaches the
    weights: a plain torch optimizer (ZeRO off in fp32), or ZeRO 1-2 in bf16 with
    ``bf16.check_grad_overflow: false``, whose remaining norm check is off for bf16.
    """
    optimizer = getattr(find_deepspeed_engine(engine), "optimizer", None)
    if optimizer is None or not hasattr(optimizer, "overflow"):
        return False
    if hasattr(optimizer, "check_grad_overflow"):  # the ZeRO 1-2 optimizer
        checks_norm = bool(getattr(optimizer, "compute_grad_norm", True)) and optimizer.dtype != torch.bfloat16
        return bool(optimizer.check_grad_overflow) or checks_norm
    # ZeRO-3 and the BF16/FP16 optimizers discard every step whose gradient norm is not finite.
    return True
