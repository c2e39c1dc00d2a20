"""From summed log-probs of a preference forward to the configured loss variant's output.

Every adapter runs the policy (and, when the variant reads it, the reference) over the
framework's batch of 2B rows — chosen, then rejected — plus, for mDPO, B more rows: the
chosen responses with a corrupted image (``corrupted_image.py``). What is left is the same
in every framework, and here.
"""

from __future__ import annotations

from typing import Any

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.errors import PluginError
from vlm_dpo_plugins.losses.logprobs import SequenceLogps, preference_logps
from vlm_dpo_plugins.losses.mdpo import corrupted_image_extras
from vlm_dpo_plugins.types import LossOutput, PreferenceLogps


def split_rows(logps: SequenceLogps, rows: int) -> tuple[SequenceLogps, SequenceLogps]:
    """The first ``rows`` rows and the rest."""
    return (
        SequenceLogps(logps.logps[:rows], logps.token_counts[:rows]),
        SequenceLogps(logps.logps[rows:], logps.token_counts[rows:]),
    )


def compute_preference_loss(
    manager: Any,
    config: VLMDPOConfig,
    policy: SequenceLogps,
    reference: SequenceLogps | None,
    *,
    pairs: int,
    with_corrupted_image: bool,
) -> tuple[LossOutput, PreferenceLogps]:
    """The variant's per-pair output through ``vlm_dpo_compute_loss``, and the pairs' log-probs it was given."""
    extras = {}
    if with_corrupted_image:
        policy, policy_corrupted = split_rows(policy, 2 * pairs)
        reference, reference_corrupted = split_rows(reference, 2 * pairs)
        extras = corrupted_image_extras(policy_corrupted, reference_corrupted)
    logps = preference_logps(policy, reference, extras)
    output = manager.hook.vlm_dpo_compute_loss(logps=logps, config=config)
    if output is None:
        raise PluginError(
            f"no plugin computed loss.type {config.loss.type!r}: the plugin that registers it must also implement "
            "vlm_dpo_compute_loss"
        )
    return output, logps
