"""TRL's preference batch in the terms the loss hooks use.

TRL's collators stack ``[chosen; rejected]`` into 2B rows, and its vision collator
repeats every image for the rejected rows, so in every tensor of the batch, per row
(``input_ids``, masks) or per image (``pixel_values``, ``image_grid_thw``, Qwen2-VL's
flattened patches), the first half belongs to the chosen rows. mDPO's conditional
term needs the chosen rows once more with a corrupted image; appending that first
half again, with its pixels replaced, gives 3B rows that go through the model in the
same single forward, which DDP requires (two forwards before one backward fail there).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlm_dpo_plugins.errors import PluginError
from vlm_dpo_plugins.losses.logprobs import SequenceLogps

NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = {key: value for key, value in batch.items() if key not in NON_MODEL_KEYS}
    kwargs["use_cache"] = False
    return kwargs


def completion_labels(batch: Mapping[str, Any]) -> torch.Tensor:
    """Input ids outside the completions set to -100: TRL's fused LM head scores only the completion tokens."""
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)


def summed_logps(per_token_logps: torch.Tensor, completion_mask: torch.Tensor) -> SequenceLogps:
    """Completion log-probs summed per row from the fused head's per-token output (position t scores token t + 1)."""
    shifted_mask = completion_mask[:, 1:]
    # Prompt-learning PEFT prepends virtual positions; the real tokens are the last ones.
    per_token_logps = per_token_logps[:, -shifted_mask.shape[1] :]
    logps = (per_token_logps * shifted_mask).sum(dim=1)
    return SequenceLogps(logps, shifted_mask.sum(dim=1))


def with_corrupted_chosen(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch with the B chosen rows appended again, their images replaced by the mean image (mDPO)."""
    rows = batch["input_ids"].shape[0]
    if rows % 2:
        raise PluginError(f"expected 2B rows (chosen, then rejected) in TRL's batch, got {rows}")
    if not any(key in batch for key in PIXEL_KEYS):
        raise PluginError(
            "loss.type 'mdpo' compares the chosen response with and without its image, but this batch has no "
            "pixel_values: mDPO needs an image in every pair (use 'sigmoid' for text-only data)"
        )
    extended: dict[str, Any] = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            extended[key] = value
            continue
        if value.shape[0] % 2:
            raise PluginError(
                f"batch['{key}'] has {value.shape[0]} entries along its first dimension; mDPO expects the chosen "
                "half first and an identical rejected half (TRL's vision collator repeats every image)"
            )
        chosen_half = value[: value.shape[0] // 2]
        if key in PIXEL_KEYS:
            # Zero in the processor's normalised space is the mean pixel: the image is present but says nothing.
            chosen_half = torch.zeros_like(chosen_half)
        extended[key] = torch.cat((value, chosen_half))
    return extended


def split_rows(logps: SequenceLogps, rows: int) -> tuple[SequenceLogps, SequenceLogps]:
    """The first ``rows`` rows and the rest."""
    return (
        SequenceLogps(logps.logps[:rows], logps.token_counts[:rows]),
        SequenceLogps(logps.logps[rows:], logps.token_counts[rows:]),
    )
