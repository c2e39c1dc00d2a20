"""Model families whose training attention is not purely causal, and what a packed row must add for them.

Gemma 3 trains with each image's soft tokens attending to each other both ways (its processor marks them in
``token_type_ids``: 1); PaliGemma is a prefix LM, its whole prefix (image tokens, BOS, prompt, newline) attending
to itself both ways (``token_type_ids``: 0 on the prefix, 1 on the response). Transformers ORs such blocks into the
causal mask when the batch carries them. A packed row keeps that only with a mask that ORs the same blocks in:
such models take the dense mask, never the two causal calls, whatever ``sharing.attention`` says.
"""

from __future__ import annotations

import torch

BIDIRECTIONAL_BLOCKS = {"gemma3": ("token_type_ids", 1), "paligemma": ("token_type_ids", 0)}
"""``model_type`` → the per-token input and the value marking tokens that attend both ways within their block (each
consecutive run of the value is one block)."""


def image_block_key(model_type: str | None) -> str | None:
    marked = BIDIRECTIONAL_BLOCKS.get(model_type or "")
    return marked[0] if marked else None


def block_marker(model_type: str | None) -> int:
    return BIDIRECTIONAL_BLOCKS.get(model_type or "", (None, 1))[1]


def image_blocks(token_types: torch.Tensor, marker: int = 1) -> torch.Tensor:
    """``[B, L]`` block id of each marked token (runs of ``marker`` in ``token_types``, numbered per row), -1
    elsewhere."""
    is_marked = token_types == marker
    starts = is_marked & ~torch.nn.functional.pad(is_marked, (1, 0), value=False)[:, :-1]
    return torch.where(is_marked, torch.cumsum(starts.long(), dim=1) - 1, -1)
