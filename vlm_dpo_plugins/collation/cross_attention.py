"""Mllama's ``cross_attention_mask`` laid out over the whole collated row, responses included.

A cross-attention model (Llama 3.2 Vision) keeps images out of the token sequence: ``cross_attention_mask``
(``[rows, tokens, images, tiles]``) says which image tiles each token attends to, every token from its
image's ``<|image|>`` up to the next image's (a run of adjacent image tokens attends on together) or the end.
A collator that asks the processor for the prompt alone (TRL's ``DataCollatorForVisionPreference``) gets the
mask at prompt length and left-padded, then concatenates the responses and moves the rows left, so the mask
no longer covers, or lines up with, the tokens the model reads: the model fails on the length, or the
responses would see no image. The mask is rebuilt here from the collated ``input_ids``, with each image's tile
count read from the prompt mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

CROSS_ATTENTION_MASK = "cross_attention_mask"


def needs_full_length_mask(batch: Mapping[str, Any]) -> bool:
    mask, input_ids = batch.get(CROSS_ATTENTION_MASK), batch.get("input_ids")
    return (
        isinstance(mask, torch.Tensor)
        and isinstance(input_ids, torch.Tensor)
        and mask.ndim == 4
        and mask.shape[1] != input_ids.shape[1]
    )


def full_length_cross_attention_mask(input_ids: torch.Tensor, prompt_mask: torch.Tensor, image_token_id: int):
    """``[rows, len(input_ids[0]), images, tiles]``: each image's valid tiles, for the tokens that attend to it.

    ``prompt_mask``: the processor's mask for the prompts (any length and padding); a row's k-th image token in
    ``input_ids`` is its k-th image. Raises ``ValueError`` naming the row when the two disagree on its images.
    """
    rows, length = input_ids.shape
    tiles_per_image = prompt_mask.amax(dim=1)  # [rows, images, tiles]: a tile is valid if any token attends to it
    images_in_mask = tiles_per_image.amax(dim=-1).sum(dim=-1)
    out = prompt_mask.new_zeros((rows, length, *prompt_mask.shape[2:]))
    for row in range(rows):
        starts = (input_ids[row] == image_token_id).nonzero().flatten().tolist()
        if len(starts) != int(images_in_mask[row]):
            raise ValueError(
                f"row {row} of the collated batch has {len(starts)} image tokens ({image_token_id}) but its "
                f"cross_attention_mask covers {int(images_in_mask[row])} images: the prompt was cut or its image "
                "tokens were changed after the processor ran"
            )
        ends = [*starts[1:], length]
        for image in reversed(range(len(starts) - 1)):
            if ends[image] == starts[image] + 1:  # adjacent image tokens attend on together
                ends[image] = ends[image + 1]
        for image, (start, end) in enumerate(zip(starts, ends)):
            out[row, start:end, image] = tiles_per_image[row, image]
    return out


class FullLengthCrossAttention:
    """A collator whose batches carry the cross-attention mask over the whole row (see the module docstring)."""

    def __init__(self, collator: Any, image_token_id: int) -> None:
        self.collator = collator
        self.image_token_id = image_token_id

    def __call__(self, examples: list[Any]) -> Any:
        batch = self.collator(examples)
        if needs_full_length_mask(batch):
            batch[CROSS_ATTENTION_MASK] = full_length_cross_attention_mask(
                batch["input_ids"], batch[CROSS_ATTENTION_MASK], self.image_token_id
            )
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.collator, name)
