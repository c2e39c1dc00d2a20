"""What a stalled run's last batch shows: identical responses, or responses the mask hides entirely.

The adapters hand every training batch to ``vlm_dpo_check_batch``; the detectors keep
only a reference to it and look inside only when a stall is reported, so a healthy
run pays nothing but the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import compress
from typing import Any

from vlm_dpo_plugins.collation.pairs import BatchLayoutError, pairs_from_batch

BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask", "labels")
"""What a pair's tokens and response masks are read from; the rest of a batch (pixel values) is never kept."""


@dataclass(frozen=True)
class BatchFacts:
    step: int
    pairs: int
    identical_pairs: int
    masked_responses: int

    def describe(self) -> str:
        return (
            f"in the batch of step {self.step}, {self.identical_pairs} of {self.pairs} pairs have token-identical "
            f"responses and {self.masked_responses} of {2 * self.pairs} responses have no trained token"
        )


def batch_facts(batch: Mapping[str, Any], step: int) -> BatchFacts | None:
    """None when the batch is not a chosen-then-rejected layout with a response mask (nothing to judge)."""
    input_ids = batch.get("input_ids")
    if input_ids is None or not hasattr(input_ids, "shape") or input_ids.dim() != 2 or input_ids.shape[0] % 2:
        return None
    view = {key: _on_host(batch[key]) for key in BATCH_KEYS if key in batch}
    try:
        pairs = pairs_from_batch(view, rows=list(range(input_ids.shape[0] // 2)))
    except BatchLayoutError:
        return None
    identical = masked = 0
    for pair in pairs:
        chosen = list(compress(pair.chosen.input_ids, pair.chosen.response_mask))
        rejected = list(compress(pair.rejected.input_ids, pair.rejected.response_mask))
        masked += (not chosen) + (not rejected)
        identical += bool(chosen) and chosen == rejected
    return BatchFacts(step=step, pairs=len(pairs), identical_pairs=identical, masked_responses=masked)


def _on_host(value: Any) -> Any:
    return value.detach().cpu() if hasattr(value, "detach") else value
