"""From summed log-probs of a preference forward to the configured loss variant's output.

Every adapter runs the policy (and, when the variant reads it, the reference) over the
framework's batch of 2B rows — chosen, then rejected — plus the extra rows a variant's
``extras`` are computed from (``extra_rows.py``). What is left is the same in every
framework, and here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.errors import PluginError
from vlm_dpo_plugins.losses.extra_rows import ExtraRows, split_extras
from vlm_dpo_plugins.losses.logprobs import SequenceLogps, preference_logps
from vlm_dpo_plugins.types import LossOutput, PreferenceLogps


def compute_preference_loss(
    manager: Any,
    config: VLMDPOConfig,
    policy: SequenceLogps,
    reference: SequenceLogps | None,
    *,
    pairs: int,
    extra_rows: Sequence[ExtraRows] = (),
) -> tuple[LossOutput, PreferenceLogps]:
    """The variant's per-pair output through ``vlm_dpo_compute_loss``, and the pairs' log-probs it was given."""
    policy, reference, extras = split_extras(policy, reference, pairs, extra_rows)
    logps = preference_logps(policy, reference, extras)
    output = manager.hook.vlm_dpo_compute_loss(logps=logps, config=config)
    if not isinstance(output, LossOutput):
        raise PluginError(
            f"loss.type {config.loss.type!r}: vlm_dpo_compute_loss returned {type(output).__name__}, not a LossOutput"
        )
    return output, logps
