"""Settings of the shared computation of a preference pair (config section ``sharing``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SharingConfig:
    prompt: bool = True
    """One sequence per pair, [prompt, chosen, rejected], instead of two: the prompt (mostly image tokens in a VLM)
    goes through the language model once per pass. Needs an attention implementation that takes a 4D mask (eager,
    sdpa); with another the adapter says so once and runs the two sequences."""
    vision_features: bool = True
    """Encode each pair's images once per step: the reference pass reuses the policy's image features while the
    vision tower and projector are frozen, and without prompt sharing the duplicated images of the rejected rows
    are not encoded again."""
