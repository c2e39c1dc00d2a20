"""Settings of the loss variants (config section ``loss``)."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_dpo_plugins.validation import require


@dataclass
class LossConfig:
    type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    fp32_logps: bool = True

    def __post_init__(self) -> None:
        require(self.beta > 0, "beta", self.beta, "beta > 0 (beta = 0 makes every DPO loss constant)")
        require(0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "a value in [0, 0.5)")
