"""mDPO's extra rows: the chosen responses again, with their images corrupted.

Every framework collates a preference batch as all chosen rows, then all rejected rows, and
sends each pair's images twice, so in every tensor of the batch, per row (``input_ids``,
masks, labels) or per image (``pixel_values``, ``image_grid_thw``, Qwen2-VL's flattened
patches), the first half belongs to the chosen rows. That first half again, pixels replaced,
is the block ``extra_rows.extend_batch`` appends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlm_dpo_plugins.errors import PluginError

PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


def corrupted_chosen_rows(batch: Mapping[str, Any], row_dims: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The B chosen rows of every tensor with rows, their images replaced by the mean image."""
    rows = batch["input_ids"].shape[0]
    if rows % 2:
        raise PluginError(f"expected 2B rows (chosen, then rejected) in the preference batch, got {rows}")
    if not any(key in batch for key in PIXEL_KEYS):
        raise PluginError(
            "loss.type 'mdpo' compares the chosen response with and without its image, but this batch has no "
            "pixel_values: mDPO needs an image in every pair (use 'sigmoid' for text-only data)"
        )
    added: dict[str, torch.Tensor] = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            continue
        dim = row_dims.get(key, 0)
        if value.shape[dim] % 2:
            raise PluginError(
                f"batch['{key}'] has {value.shape[dim]} entries along dimension {dim}; mDPO expects the chosen "
                "half first and an identical rejected half (the collator repeats every image)"
            )
        chosen_half = value.narrow(dim, 0, value.shape[dim] // 2)
        if key in PIXEL_KEYS:
            # Zero in the processor's normalised space is the mean pixel: the image is present but says nothing.
            chosen_half = torch.zeros_like(chosen_half)
        added[key] = chosen_half
    return added
