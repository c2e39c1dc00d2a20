"""Settings of the stability guards (config section ``guards``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vlm_dpo_plugins.validation import PARAMETER_GROUPS, require, require_choice

BackoffTrigger = Literal["skip", "spike"]


@dataclass
class GuardsConfig:
    max_grad_norm: float | None = 1.0
    group_max_grad_norm: dict[str, float] = field(default_factory=dict)
    skip_nonfinite: bool = True
    max_consecutive_skips: int = 8
    spike_window: int = 20
    spike_factor: float | None = 3.0
    skip_spikes: bool = False
    lr_backoff_factor: float | None = None
    lr_backoff_steps: int = 10
    lr_backoff_on: tuple[BackoffTrigger, ...] = ("skip", "spike")
    non_reentrant_checkpointing: bool = True
    tune_deepspeed_buckets: bool = True

    def __post_init__(self) -> None:
        if self.max_grad_norm is not None:
            require(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "a norm > 0, or null to disable")
        for group, norm in self.group_max_grad_norm.items():
            require_choice("group_max_grad_norm", group, PARAMETER_GROUPS)
            require(norm > 0, f"group_max_grad_norm.{group}", norm, "a norm > 0")
        require(self.max_consecutive_skips >= 1, "max_consecutive_skips", self.max_consecutive_skips, "an integer >= 1")
        require(self.spike_window >= 3, "spike_window", self.spike_window, "an integer >= 3 (losses in the median)")
        if self.spike_factor is not None:
            require(self.spike_factor > 1, "spike_factor", self.spike_factor, "a factor > 1, or null to disable")
        require(
            not (self.skip_spikes and self.spike_factor is None), "skip_spikes", self.skip_spikes,
            "false while spike_factor is null (no spike is ever detected)",
        )
        if self.lr_backoff_factor is not None:
            require(
                0 < self.lr_backoff_factor < 1, "lr_backoff_factor", self.lr_backoff_factor,
                "a factor in (0, 1), or null to disable",
            )
        require(self.lr_backoff_steps >= 1, "lr_backoff_steps", self.lr_backoff_steps, "an integer >= 1")
