"""Settings of the loss variants (config section ``loss``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from vlm_dpo_plugins.validation import require

BUILTIN_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo", "rpo", "mdpo", "mpo")

VARIANT_KEYS = {
    "label_smoothing": ("sigmoid", "robust", "simpo", "rpo"),
    "simpo_gamma": ("simpo",),
    "rpo_alpha": ("rpo",),
    "mdpo_conditional_weight": ("mdpo",),
    "mdpo_anchor_weight": ("mdpo",),
    "mdpo_anchor_delta": ("mdpo",),
    "mpo_preference_weight": ("mpo",),
    "mpo_quality_weight": ("mpo",),
    "mpo_generation_weight": ("mpo",),
    "mpo_running_baseline": ("mpo",),
}
"""Keys only some built-in variants read. Setting one for a built-in variant that ignores it is an error,
because a value a user chose and the run silently ignored is worse than a refusal. A third-party ``type``
may read any key, so it is not checked."""


@dataclass
class LossConfig:
    type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    fp32_logps: bool = True
    simpo_gamma: float = 0.5
    rpo_alpha: float = 1.0
    mdpo_conditional_weight: float = 1.0
    mdpo_anchor_weight: float = 1.0
    mdpo_anchor_delta: float = 0.0
    mpo_preference_weight: float = 0.8
    mpo_quality_weight: float = 0.2
    mpo_generation_weight: float = 1.0
    mpo_running_baseline: bool = True

    def __post_init__(self) -> None:
        require(self.beta > 0, "beta", self.beta, "beta > 0 (beta = 0 makes every DPO loss constant)")
        require(0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "a value in [0, 0.5)")
        require(self.simpo_gamma >= 0, "simpo_gamma", self.simpo_gamma, "a target reward margin >= 0")
        require(self.rpo_alpha > 0, "rpo_alpha", self.rpo_alpha, "a weight > 0 for the chosen NLL term")
        for key in ("mdpo_conditional_weight", "mdpo_anchor_weight"):
            value = getattr(self, key)
            require(value >= 0, key, value, "a weight >= 0 (0 drops the term)")
        mpo_weights = ("mpo_preference_weight", "mpo_quality_weight", "mpo_generation_weight")
        for key in mpo_weights:
            value = getattr(self, key)
            require(math.isfinite(value) and value >= 0, key, value, "a finite weight >= 0 (0 drops the term)")
        if self.type == "mpo":
            require(
                any(getattr(self, key) > 0 for key in mpo_weights), "mpo_preference_weight",
                self.mpo_preference_weight, "a weight > 0 for one of the three MPO terms at least (all three 0 make "
                "the loss constant)",
            )
        require(math.isfinite(self.mdpo_anchor_delta), "mdpo_anchor_delta", self.mdpo_anchor_delta, "a finite number")
        if self.type in BUILTIN_LOSS_TYPES:
            self._reject_keys_the_variant_ignores()
        if self.type == "robust":
            require(
                self.label_smoothing > 0, "label_smoothing", self.label_smoothing,
                "the assumed label-flip rate in (0, 0.5) for loss.type 'robust' (at 0 it is plain sigmoid DPO)",
            )

    def _reject_keys_the_variant_ignores(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, readers in VARIANT_KEYS.items():
            value = getattr(self, key)
            if self.type not in readers and value != defaults[key]:
                require(
                    False, key, value,
                    f"{defaults[key]!r} (the default): loss.type {self.type!r} does not read it; "
                    f"it applies to {', '.join(repr(r) for r in readers)}",
                )
