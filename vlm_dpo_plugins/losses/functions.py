"""Closed-form DPO-family losses over per-pair log-probabilities.

Every function is pure: ``fn(logps: PreferenceLogps, config: LossConfig) -> LossOutput`` with per-pair
losses (the caller reduces them), detached implicit rewards, and batch-mean metrics. Notation:
``chosen_ratio = chosen - ref_chosen``, ``rejected_ratio = rejected - ref_rejected``,
``h = chosen_ratio - rejected_ratio`` (the log-ratio margin); implicit rewards are ``beta * ratio``.
Log-probs are summed over response tokens; a variant that length-normalises divides by the token counts.
Everything is computed in fp32 or wider when ``fp32_logps`` is set (see ``inputs.computation_dtype``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from vlm_dpo_plugins.losses.inputs import prepare
from vlm_dpo_plugins.losses.settings import LossConfig
from vlm_dpo_plugins.types import LossInputs, LossOutput, PreferenceLogps

DPO_INPUTS = LossInputs()
IPO_INPUTS = LossInputs()  # token counts optional: used to length-average when given
SIMPO_INPUTS = LossInputs(reference=False, token_counts=True)
RPO_INPUTS = LossInputs(token_counts=True)


def logistic_loss(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """``-log sigmoid(logits)``, mixed with the flipped label at rate ``label_smoothing`` (cDPO)."""
    if label_smoothing == 0:
        return -F.logsigmoid(logits)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def preference_output(
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    terms: Mapping[str, torch.Tensor] | None = None,
) -> LossOutput:
    """Wrap per-pair results with the shared reward metrics plus the variant's own ``terms`` (batch means)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    summary = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        **{name: torch.as_tensor(value).detach() for name, value in (terms or {}).items()},
    }
    # One stack and one .tolist(): a single device sync for all metrics instead of one per metric.
    means = torch.stack([value.float().mean().to(chosen_rewards.device) for value in summary.values()]).tolist()
    return LossOutput(losses, chosen_rewards, rejected_rewards, dict(zip(summary, means)))


def sigmoid_loss(logps: PreferenceLogps, config: LossConfig) -> LossOutput:
    """Rafailov et al. 2023: ``-log sigmoid(beta h)``; conservative DPO (cDPO) when ``label_smoothing`` > 0."""
    x = prepare(logps, config, "sigmoid", DPO_INPUTS)
    chosen_ratio, rejected_ratio = x.chosen - x.ref_chosen, x.rejected - x.ref_rejected
    losses = logistic_loss(config.beta * (chosen_ratio - rejected_ratio), config.label_smoothing)
    return preference_output(losses, config.beta * chosen_ratio, config.beta * rejected_ratio)


def hinge_loss(logps: PreferenceLogps, config: LossConfig) -> LossOutput:
    """SLiC (Zhao et al. 2023) hinge on the scaled margin: ``relu(1 - beta h)``."""
    x = prepare(logps, config, "hinge", DPO_INPUTS)
    chosen_ratio, rejected_ratio = x.chosen - x.ref_chosen, x.rejected - x.ref_rejected
    losses = torch.relu(1 - config.beta * (chosen_ratio - rejected_ratio))
    return preference_output(losses, config.beta * chosen_ratio, config.beta * rejected_ratio)


def ipo_loss(logps: PreferenceLogps, config: LossConfig) -> LossOutput:
    """Azar et al. 2023: ``(h - 1/(2 beta))^2`` on per-token-average log-probs.

    The squared target 1/(2 beta) is on the scale of average log-probs; on summed log-probs the regression
    target would grow with response length. With token counts, ratios are divided by them here; without,
    the log-probs given are taken to be averages already (what LLaMA-Factory's trainer passes for IPO).
    """
    x = prepare(logps, config, "ipo", IPO_INPUTS, divides_by_counts=True)
    chosen_ratio, rejected_ratio = x.chosen - x.ref_chosen, x.rejected - x.ref_rejected
    if x.has_token_counts:
        chosen_ratio = chosen_ratio / x.chosen_token_count
        rejected_ratio = rejected_ratio / x.rejected_token_count
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * config.beta)) ** 2
    length_normalised = torch.tensor(float(x.has_token_counts))
    return preference_output(
        losses, config.beta * chosen_ratio, config.beta * rejected_ratio, {"ipo/length_normalised": length_normalised}
    )


def robust_loss(logps: PreferenceLogps, config: LossConfig) -> LossOutput:
    """Chowdhury et al. 2024 (rDPO): unbiased DPO under preference labels flipped at rate eps = label_smoothing.

    ``((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) / (1 - 2 eps)``. Unlike cDPO it
    subtracts the flipped-label term, so a single pair's loss can be negative; only its expectation is DPO's.
    """
    x = prepare(logps, config, "robust", DPO_INPUTS)
    chosen_ratio, rejected_ratio = x.chosen - x.ref_chosen, x.rejected - x.ref_rejected
    logits = config.beta * (chosen_ratio - rejected_ratio)
    eps = config.label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return preference_output(losses, config.beta * chosen_ratio, config.beta * rejected_ratio)


def simpo_loss(logps: PreferenceLogps, config: LossConfig) -> LossOutput:
    """Meng et al. 2024: reference-free, ``-log sigmoid(beta (chosen/|y_w| - rejected/|y_l|) - gamma)``.

    The reward is ``beta`` times the per-token-average log-prob; ``gamma`` (``simpo_gamma``) is the target
    reward margin, in reward units. SimPO's beta is far larger than DPO's (a few units, not 0.1).
    """
    x = prepare(logps, config, "simpo", SIMPO_INPUTS, divides_by_counts=True)
    chosen_rewards = config.beta * x.chosen / x.chosen_token_count
    rejected_rewards = config.beta * x.rejected / x.rejected_token_count
    losses = logistic_loss(chosen_rewards - rejected_rewards - config.simpo_gamma, config.label_smoothing)
    return preference_output(losses, chosen_rewards, rejected_rewards)


def rpo_loss(logps: PreferenceLogps, config: LossConfig) -> LossOutput:
    """Pang et al. 2024 (RPO): sigmoid DPO + ``rpo_alpha`` * NLL of the chosen response per token.

    The NLL is ``-chosen / chosen_token_count`` per pair, so it is on the scale of a language-model loss
    whatever the response length, and keeps the chosen likelihood from falling while the margin grows.
    """
    x = prepare(logps, config, "rpo", RPO_INPUTS, divides_by_counts=True)
    chosen_ratio, rejected_ratio = x.chosen - x.ref_chosen, x.rejected - x.ref_rejected
    dpo_losses = logistic_loss(config.beta * (chosen_ratio - rejected_ratio), config.label_smoothing)
    nll = -x.chosen / x.chosen_token_count
    losses = dpo_losses + config.rpo_alpha * nll
    return preference_output(
        losses, config.beta * chosen_ratio, config.beta * rejected_ratio, {"rpo/dpo_loss": dpo_losses, "rpo/nll": nll}
    )
