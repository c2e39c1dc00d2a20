"""The collated-row fixes for cross-attention models: the full-length mask and a response's leading BOS."""

from __future__ import annotations

import pytest
import torch

from vlm_dpo_plugins.collation.cross_attention import full_length_cross_attention_mask, needs_full_length_mask
from vlm_dpo_plugins.collation.response_bos import drop_response_bos

IMAGE, BOS, PAD = 9, 1, 0


def prompt_mask(tiles_per_image: list[list[int]], length: int = 3, max_tiles: int = 4) -> torch.Tensor:
    """A processor-style prompt mask: any token row may hold the tiles; only the tile counts matter."""
    rows, images = len(tiles_per_image), max(len(row) for row in tiles_per_image)
    mask = torch.zeros(rows, length, images, max_tiles, dtype=torch.long)
    for row, counts in enumerate(tiles_per_image):
        for image, count in enumerate(counts):
            mask[row, -1, image, :count] = 1
    return mask


def test_each_image_covers_its_tokens_up_to_the_next_image_and_the_last_to_the_end():
    input_ids = torch.tensor([[BOS, IMAGE, 5, 6, IMAGE, 7, 8, PAD]])
    mask = full_length_cross_attention_mask(input_ids, prompt_mask([[2, 3]]), IMAGE)
    assert mask.shape == (1, 8, 2, 4)
    expected = torch.zeros(1, 8, 2, 4, dtype=torch.long)
    expected[0, 1:4, 0, :2] = 1
    expected[0, 4:, 1, :3] = 1
    assert torch.equal(mask, expected)


def test_adjacent_image_tokens_attend_on_together():
    input_ids = torch.tensor([[BOS, IMAGE, IMAGE, 5, 6]])
    mask = full_length_cross_attention_mask(input_ids, prompt_mask([[1, 4]]), IMAGE)
    assert mask[0, :, 0, 0].tolist() == [0, 1, 1, 1, 1]
    assert mask[0, :, 1, :].sum(dim=-1).tolist() == [0, 0, 4, 4, 4]


def test_a_row_whose_image_tokens_disagree_with_its_mask_is_named():
    input_ids = torch.tensor([[BOS, IMAGE, 5], [BOS, 5, 6]])
    with pytest.raises(ValueError, match=r"row 1 of the collated batch has 0 image tokens \(9\) but its "):
        full_length_cross_attention_mask(input_ids, prompt_mask([[1], [1]]), IMAGE)


def test_only_a_mask_shorter_or_longer_than_the_rows_is_rebuilt():
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "cross_attention_mask": torch.zeros(2, 5, 1, 4)}
    assert not needs_full_length_mask(batch)
    batch["cross_attention_mask"] = torch.zeros(2, 3, 1, 4)
    assert needs_full_length_mask(batch)


def test_a_leading_response_bos_is_taken_out_and_the_row_closed_up():
    batch = {
        "input_ids": torch.tensor([[BOS, 4, BOS, 5, 6], [BOS, 4, 7, 8, PAD]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
        "completion_mask": torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]]),
        "token_type_ids": torch.tensor([[0, 1, 0, 0, 0], [0, 1, 0, 0, 0]]),
    }
    assert drop_response_bos(batch, BOS, PAD) == 1
    assert batch["input_ids"].tolist() == [[BOS, 4, 5, 6, PAD], [BOS, 4, 7, 8, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 1, 0, 0, 0], [0, 1, 0, 0, 0]]
    assert drop_response_bos(batch, BOS, PAD) == 0  # a BOS in the prompt is not a response's
