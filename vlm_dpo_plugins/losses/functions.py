"""Closed-form DPO-family losses over per-pair log-probabilities.

All follow one convention: ``h = (chosen - ref_chosen) - (rejected - ref_rejected)``
is the log-ratio margin; implicit rewards are ``beta * (policy - reference)``.
Inputs are promoted to fp32 when ``fp32_logps`` is set, because bf16 log-prob
differences of long responses lose most of their significant digits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm_dpo_plugins.losses.settings import LossConfig
from vlm_dpo_plugins.types import LossOutput, PreferenceLogps


def _prepared(logps: PreferenceLogps, config: LossConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tensors = (logps.chosen, logps.rejected, logps.ref_chosen, logps.ref_rejected)
    if config.fp32_logps:
        tensors = tuple(t.float() for t in tensors)
    chosen, rejected, ref_chosen, ref_rejected = tensors
    chosen_ratio = chosen - ref_chosen
    rejected_ratio = rejected - ref_rejected
    return chosen_ratio - rejected_ratio, config.beta * chosen_ratio.detach(), config.beta * rejected_ratio.detach()


def sigmoid_loss(logps: PreferenceLogps, config: LossConfig) -> LossOutput:
    """Rafailov et al. 2023, with conservative label smoothing (cDPO) when ``label_smoothing`` > 0."""
    margin, chosen_rewards, rejected_rewards = _prepared(logps, config)
    smoothing = config.label_smoothing
    losses = -F.logsigmoid(config.beta * margin) * (1 - smoothing) - F.logsigmoid(-config.beta * margin) * smoothing
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def hinge_loss(logps: PreferenceLogps, config: LossConfig) -> LossOutput:
    """SLiC-style hinge on the scaled margin: ``relu(1 - beta * h)``."""
    margin, chosen_rewards, rejected_rewards = _prepared(logps, config)
    return LossOutput(torch.relu(1 - config.beta * margin), chosen_rewards, rejected_rewards)


def ipo_loss(logps: PreferenceLogps, config: LossConfig) -> LossOutput:
    """Azar et al. 2023: ``(h - 1 / (2 beta))^2``; pass length-averaged log-probs, as the paper does."""
    margin, chosen_rewards, rejected_rewards = _prepared(logps, config)
    return LossOutput((margin - 1 / (2 * config.beta)) ** 2, chosen_rewards, rejected_rewards)


BUILTIN_LOSSES = {"sigmoid": sigmoid_loss, "hinge": hinge_loss, "ipo": ipo_loss}
