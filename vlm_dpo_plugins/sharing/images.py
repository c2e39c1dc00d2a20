"""The image tensors of a preference batch, which every framework repeats for the rejected rows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlm_dpo_plugins.sharing.packing import PackingUnavailable

PER_TOKEN_KEYS = frozenset(
    {
        "input_ids",
        "attention_mask",
        "completion_mask",
        "labels",
        "token_type_ids",
        "mm_token_type_ids",
        "position_ids",
        "cross_attention_mask",
    }
)
"""Batch keys with one value per token of each row; every other tensor of a model's inputs is per image."""

PER_ROW_KEYS = frozenset({"rope_deltas"})
"""Batch keys with one value per row that packing reduces to the chosen rows' (only generation reads them)."""


def chosen_half_of_images(batch: Mapping[str, Any], per_token_keys: frozenset[str] = PER_TOKEN_KEYS) -> dict[str, Any]:
    """The per-image tensors of ``batch`` cut to the chosen rows' images, after checking the rejected half repeats them.

    Raises ``PackingUnavailable`` naming the key when a tensor's second half is not its first half again: the pair's
    rows then carry different images (mDPO's corrupted copy, or a framework that collates differently).
    """
    halves = {}
    for key, value in batch.items():
        if key in per_token_keys or key in PER_ROW_KEYS or not isinstance(value, torch.Tensor) or value.ndim == 0:
            continue
        count = value.shape[0]
        first, second = value[: count // 2], value[count // 2 :]
        if count % 2 or not torch.equal(first, second):
            raise PackingUnavailable(
                f"batch[{key!r}] is not the chosen rows' images repeated for the rejected rows ({count} entries)"
            )
        halves[key] = first
    return halves


def images_repeated(batch: Mapping[str, Any], per_token_keys: frozenset[str] = PER_TOKEN_KEYS) -> bool:
    try:
        chosen_half_of_images(batch, per_token_keys)
    except PackingUnavailable:
        return False
    return True
