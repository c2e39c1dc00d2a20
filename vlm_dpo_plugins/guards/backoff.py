"""Learning-rate back-off: a smaller learning rate for the next N optimizer steps after trouble.

The scale is applied only around ``optimizer.step()`` and undone right after it by
writing back the saved values. LR schedulers therefore never see a scaled rate —
schedulers that update ``group["lr"]`` multiplicatively (ExponentialLR, …) would
otherwise keep the scale for good — and the restore is exact, not a division.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class LearningRateBackoff:
    """Counts the steps left at a reduced learning rate; ``factor=None`` switches it off."""

    def __init__(self, factor: float | None, steps: int) -> None:
        self.factor = factor
        self.steps = steps
        self.remaining = 0

    @property
    def scale(self) -> float:
        return self.factor if self.factor is not None and self.remaining > 0 else 1.0

    def trigger(self) -> None:
        """Start (or restart, never stack) a back-off covering the next ``steps`` optimizer steps taken."""
        if self.factor is not None:
            self.remaining = self.steps

    def step_taken(self) -> None:
        self.remaining = max(0, self.remaining - 1)

    def state_dict(self) -> dict[str, Any]:
        return {"remaining": self.remaining}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.remaining = int(state["remaining"])


@contextmanager
def scaled_learning_rates(optimizer: torch.optim.Optimizer, scale: float) -> Iterator[None]:
    """Multiply every parameter group's learning rate by ``scale`` inside the block; restore the exact values after."""
    if scale == 1.0:
        yield
        return
    saved = [group["lr"] for group in optimizer.param_groups]
    for group, rate in zip(optimizer.param_groups, saved):
        group["lr"] = rate * scale  # a new object (float or tensor): the saved one stays untouched for the restore
    try:
        yield
    finally:
        for group, rate in zip(optimizer.param_groups, saved):
            group["lr"] = rate
