"""mDPO (Wang et al. 2024, arXiv 2406.11839): DPO that cannot ignore the image.

Plain DPO on image-text pairs can be won from the text alone ("unconditional preference"). mDPO adds:
- a conditional preference: the *same* chosen response is preferred under the real image over a
  corrupted or absent image, ``-log sigmoid(beta (chosen_ratio - corrupted_ratio))``;
- an anchor that keeps the chosen reward above ``delta``: ``-log sigmoid(beta chosen_ratio - delta)``,
  because DPO alone may lower both likelihoods as long as the rejected one falls faster.

The corrupted-image log-probs come from a second forward over the chosen rows with the image corrupted
(the paper keeps a small random crop) or removed, for the policy and the reference, and arrive in
``PreferenceLogps.extras`` under ``CORRUPTED_CHOSEN`` and ``REF_CORRUPTED_CHOSEN``.
"""

from __future__ import annotations

import torch

from vlm_dpo_plugins.losses.functions import logistic_loss, preference_output
from vlm_dpo_plugins.losses.inputs import prepare
from vlm_dpo_plugins.losses.logprobs import SequenceLogps
from vlm_dpo_plugins.losses.settings import LossConfig
from vlm_dpo_plugins.types import LossInputs, LossOutput, PreferenceLogps

CORRUPTED_CHOSEN = "chosen_corrupted_image"
"""Policy log-prob of the chosen response given the corrupted (or no) image, summed over its tokens."""
REF_CORRUPTED_CHOSEN = "ref_chosen_corrupted_image"
"""The same under the reference model."""

MDPO_INPUTS = LossInputs(extras=(CORRUPTED_CHOSEN, REF_CORRUPTED_CHOSEN))


def mdpo_loss(logps: PreferenceLogps, config: LossConfig) -> LossOutput:
    """``dpo + mdpo_conditional_weight * conditional + mdpo_anchor_weight * anchor`` per pair (paper: 1, 1, delta 0)."""
    x = prepare(logps, config, "mdpo", MDPO_INPUTS)
    chosen_ratio, rejected_ratio = x.chosen - x.ref_chosen, x.rejected - x.ref_rejected
    corrupted_ratio = x.extras[CORRUPTED_CHOSEN] - x.extras[REF_CORRUPTED_CHOSEN]
    beta = config.beta
    dpo = logistic_loss(beta * (chosen_ratio - rejected_ratio))
    conditional = logistic_loss(beta * (chosen_ratio - corrupted_ratio))
    anchor = logistic_loss(beta * chosen_ratio - config.mdpo_anchor_delta)
    losses = dpo + config.mdpo_conditional_weight * conditional + config.mdpo_anchor_weight * anchor
    terms = {
        "mdpo/dpo_loss": dpo,
        "mdpo/conditional_loss": conditional,
        "mdpo/anchor_loss": anchor,
        "mdpo/conditional_margins": beta * (chosen_ratio - corrupted_ratio),
        "mdpo/conditional_accuracies": (chosen_ratio > corrupted_ratio).to(chosen_ratio.dtype),
    }
    return preference_output(losses, beta * chosen_ratio, beta * rejected_ratio, terms)


def corrupted_image_extras(policy: SequenceLogps, reference: SequenceLogps) -> dict[str, torch.Tensor]:
    """``PreferenceLogps.extras`` for mDPO from the chosen rows run with the corrupted image (policy, reference)."""
    if not torch.equal(policy.token_counts.cpu(), reference.token_counts.cpu()):
        raise ValueError(
            "mDPO corrupted-image log-probs: policy and reference summed different numbers of response tokens "
            f"({policy.token_counts.tolist()} vs {reference.token_counts.tolist()}); run both on the same batch"
        )
    return {CORRUPTED_CHOSEN: policy.logps, REF_CORRUPTED_CHOSEN: reference.logps}
