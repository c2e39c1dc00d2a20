"""Model families whose training attention is not purely causal, and what a packed row must add for them.

Gemma 3 trains with each image's soft tokens attending to each other both ways (its processor marks them in
``token_type_ids``; transformers ORs the blocks into the causal mask when the batch carries them). A packed
row keeps that only with a mask that ORs the same blocks in: such models take the dense mask, never the
two causal calls, whatever ``sharing.attention`` says.
"""

from __future__ import annotations

import torch

BIDIRECTIONAL_IMAGE_BLOCKS = {"gemma3": "token_type_ids"}
"""``model_type`` → the per-token input marking image tokens (1), each consecutive run one bidirectional block."""


def image_block_key(model_type: str | None) -> str | None:
    return BIDIRECTIONAL_IMAGE_BLOCKS.get(model_type or "")


def image_blocks(token_types: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` block id of each image token (runs of 1 in ``token_types``, numbered per row), -1 elsewhere."""
    is_image = token_types == 1
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    return torch.where(is_image, torch.cumsum(starts.long(), dim=1) - 1, -1)
