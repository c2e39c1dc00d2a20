"""Settings of the shared computation of a preference pair (config section ``sharing``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from vlm_dpo_plugins.validation import require, require_choice

PairAttention = Literal["auto", "dense"]
ReferenceSource = Literal["live", "precompute"]


@dataclass
class SharingConfig:
    prompt: bool = True
    """One sequence per pair, [prompt, chosen, rejected], instead of two: the prompt (mostly image tokens in a VLM)
    goes through the language model once per pass."""
    attention: PairAttention = "auto"
    """How a packed row keeps its two responses apart. ``auto``: two causal kernel calls per row, no mask, for a
    model whose attention goes through transformers' registry (``sdpa``, ``flash_attention_2``, ...), and a dense 4D
    mask for ``eager``; ``dense``: the 4D mask (``eager``, ``sdpa``) wherever it applies."""
    vision_features: bool = True
    """Encode each pair's images once per step: the reference pass reuses the policy's image features while the
    vision tower and projector are frozen, and without prompt sharing the duplicated images of the rejected rows
    are not encoded again."""

    reference: ReferenceSource = "live"
    """Where the reference log-probs come from. ``live``: a reference forward in every step; ``precompute``: one
    pass of the reference over the training set before step 0 (images encoded once per pair, packed rows), cached
    on disk by the content of each tokenized pair and its images; the steps then run no reference forward, and a
    separate reference model is released from memory (docs/performance.md)."""
    reference_cache: str | None = None
    """The folder of the precomputed log-probs (one file per reference model); default: ``vlm_dpo_reference`` in
    the output folder. A folder shared between runs reuses what an earlier run computed for the same rows."""

    def __post_init__(self) -> None:
        require_choice("attention", self.attention, ("auto", "dense"))
        require_choice("reference", self.reference, ("live", "precompute"))
        folder = self.reference_cache
        require(
            folder is None or (isinstance(folder, (str, os.PathLike)) and str(folder).strip() != ""),
            "reference_cache",
            self.reference_cache,
            "a folder path, or null for vlm_dpo_reference in the output folder",
        )
