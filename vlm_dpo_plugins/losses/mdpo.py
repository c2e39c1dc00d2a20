"""mDPO (Wang et al. 2024, arXiv 2406.11839): DPO that cannot ignore the image.

Plain DPO on image-text pairs can be won from the text alone ("unconditional preference"). mDPO adds:
- a conditional preference: the *same* chosen response is preferred under the real image over a
  corrupted or absent image, ``-log sigmoid(beta (chosen_ratio - corrupted_ratio))``;
- an anchor that keeps the chosen reward above ``delta``: ``-log sigmoid(beta chosen_ratio - delta)``,
  because DPO alone may lower both likelihoods as long as the rejected one falls faster.

The corrupted-image log-probs come from the chosen rows run again with the image corrupted (the paper keeps a
small random crop; here the mean image), for the policy and the reference, in the same forward as the pairs
(``CORRUPTED_IMAGE_ROWS``), and arrive in ``PreferenceLogps.extras`` under ``CORRUPTED_CHOSEN`` and
``REF_CORRUPTED_CHOSEN``.
"""

from __future__ import annotations

from vlm_dpo_plugins.losses.corrupted_image import corrupted_chosen_rows
from vlm_dpo_plugins.losses.extra_rows import ExtraRows
from vlm_dpo_plugins.losses.functions import logistic_loss, preference_output
from vlm_dpo_plugins.losses.inputs import prepare
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


CORRUPTED_IMAGE_ROWS = ExtraRows(
    "corrupted-image", corrupted_chosen_rows, policy_key=CORRUPTED_CHOSEN, reference_key=REF_CORRUPTED_CHOSEN
)
"""How mDPO's extras are computed: the chosen rows again with the mean image, through policy and reference."""
