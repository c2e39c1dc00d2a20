"""Settings of the stability guards (config section ``guards``)."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_dpo_plugins.validation import require


@dataclass
class GuardsConfig:
    max_grad_norm: float | None = 1.0
    skip_nonfinite: bool = True
    max_consecutive_skips: int = 8
    non_reentrant_checkpointing: bool = True

    def __post_init__(self) -> None:
        if self.max_grad_norm is not None:
            require(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "a norm > 0, or null to disable")
        require(self.max_consecutive_skips >= 1, "max_consecutive_skips", self.max_consecutive_skips, "an integer >= 1")
