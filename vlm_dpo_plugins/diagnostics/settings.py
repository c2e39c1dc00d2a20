"""Settings of the detectors (config section ``diagnostics``)."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_dpo_plugins.validation import require


@dataclass
class DiagnosticsConfig:
    enabled: bool = True
    stall_steps: int = 10
    stall_tolerance: float = 1e-3
    lora_inert_steps: int = 10
    lora_inert_tolerance: float = 1e-3

    def __post_init__(self) -> None:
        require(self.stall_steps >= 1, "stall_steps", self.stall_steps, "an integer >= 1")
        require(self.stall_tolerance > 0, "stall_tolerance", self.stall_tolerance, "a tolerance > 0")
        require(self.lora_inert_steps >= 1, "lora_inert_steps", self.lora_inert_steps, "an integer >= 1")
        require(self.lora_inert_tolerance > 0, "lora_inert_tolerance", self.lora_inert_tolerance, "a tolerance > 0")
