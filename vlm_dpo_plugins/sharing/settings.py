"""Settings of the shared computation of a preference pair (config section ``sharing``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlm_dpo_plugins.validation import require_choice

PairAttention = Literal["auto", "dense"]


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

    def __post_init__(self) -> None:
        require_choice("attention", self.attention, ("auto", "dense"))
