"""The built-in loss variants by ``loss.type`` name, and what each needs from the adapter."""

from __future__ import annotations

import functools
from collections.abc import Callable

from vlm_dpo_plugins.losses.functions import (
    DPO_INPUTS,
    IPO_INPUTS,
    RPO_INPUTS,
    SIMPO_INPUTS,
    hinge_loss,
    ipo_loss,
    robust_loss,
    rpo_loss,
    sigmoid_loss,
    simpo_loss,
)
from vlm_dpo_plugins.losses.mdpo import MDPO_INPUTS, mdpo_loss
from vlm_dpo_plugins.losses.mpo import MPO_INPUTS, RewardBaseline, mpo_loss

STATELESS_LOSSES = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "robust": robust_loss,
    "simpo": simpo_loss,
    "rpo": rpo_loss,
    "mdpo": mdpo_loss,
}


def builtin_losses(baseline: RewardBaseline) -> dict[str, Callable]:
    """Every built-in variant; MPO's reads and moves ``baseline``, the run's own."""
    return {**STATELESS_LOSSES, "mpo": functools.partial(mpo_loss, baseline=baseline)}


BUILTIN_LOSS_INPUTS = {
    "sigmoid": DPO_INPUTS,
    "hinge": DPO_INPUTS,
    "ipo": IPO_INPUTS,
    "robust": DPO_INPUTS,
    "simpo": SIMPO_INPUTS,
    "rpo": RPO_INPUTS,
    "mdpo": MDPO_INPUTS,
    "mpo": MPO_INPUTS,
}
