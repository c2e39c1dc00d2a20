"""Settings of the detectors (config section ``diagnostics``)."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_dpo_plugins.validation import require


@dataclass
class DiagnosticsConfig:
    enabled: bool = True
    stall_steps: int = 10
    stall_tolerance: float = 1e-3
    no_gradient_steps: int = 3
    lora_inert_steps: int = 10
    lora_inert_tolerance: float = 1e-3
    trend_steps: int = 10
    trend_rise: float = 0.0
    accuracy_band: float = 0.15
    reward_comovement: float = 0.5
    reward_drift_ratio: float = 5.0
    oscillation_steps: int = 12
    oscillation_min_amplitude: float = 0.1

    def __post_init__(self) -> None:
        require(self.stall_steps >= 1, "stall_steps", self.stall_steps, "an integer >= 1")
        require(self.stall_tolerance > 0, "stall_tolerance", self.stall_tolerance, "a tolerance > 0")
        require(self.no_gradient_steps >= 1, "no_gradient_steps", self.no_gradient_steps, "an integer >= 1")
        require(self.lora_inert_steps >= 1, "lora_inert_steps", self.lora_inert_steps, "an integer >= 1")
        require(self.lora_inert_tolerance > 0, "lora_inert_tolerance", self.lora_inert_tolerance, "a tolerance > 0")
        require(self.trend_steps >= 4, "trend_steps", self.trend_steps, "an integer >= 4 (two halves to compare)")
        require(self.trend_rise >= 0, "trend_rise", self.trend_rise, "a loss rise >= 0")
        require(self.reward_drift_ratio > 0, "reward_drift_ratio", self.reward_drift_ratio, "a ratio > 0")
        require(0 < self.accuracy_band < 0.5, "accuracy_band", self.accuracy_band, "a width in (0, 0.5)")
        require(
            -1 <= self.reward_comovement <= 1, "reward_comovement", self.reward_comovement, "a correlation in [-1, 1]"
        )
        require(self.oscillation_steps >= 4, "oscillation_steps", self.oscillation_steps, "an integer >= 4")
        require(
            self.oscillation_min_amplitude > 0,
            "oscillation_min_amplitude",
            self.oscillation_min_amplitude,
            "an amplitude > 0",
        )
