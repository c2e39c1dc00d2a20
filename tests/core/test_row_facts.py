"""``RowFactsEncoder``: what a lazily encoding framework's rows carry beside the encoding, for the checks."""

from __future__ import annotations

from vlm_dpo_plugins.adapters.hf_trainer.prescan import RowFactsEncoder
from vlm_dpo_plugins.collation.flow import prepare
from vlm_dpo_plugins.collation.pairs import IMAGE_COUNT_KEY, count_images


def encode(row, return_length=False):
    assert "row_index" not in row, "the framework's encoder must never see the plugins' key"
    return {"chosen_input_ids": [1, 2], "rejected_input_ids": [1, 3], "length": 2 if return_length else None}


def test_the_image_count_and_the_position_go_beside_the_encoding_and_never_reach_the_collator():
    encoder = RowFactsEncoder(encode, "row_index")
    raw = {"messages": [], "images": ["a.png", "b.png"], "row_index": 7}
    encoded = encoder(raw, return_length=True)
    assert count_images(encoded) == 2 and encoded["row_index"] == 7 and encoded["length"] == 2
    assert raw["row_index"] == 7  # the dataset's row is not changed
    assert prepare([encoded], [0], "row_index") == [{"chosen_input_ids": [1, 2], "rejected_input_ids": [1, 3],
                                                   "length": 2}]
    assert encoder({"messages": [], "images": None})[IMAGE_COUNT_KEY] == 0  # a text-only row
    assert "row_index" not in encoder({"messages": []})  # before the pre-scan rows carry no position


def test_wrapping_twice_encodes_once():
    twice = RowFactsEncoder(RowFactsEncoder(encode, "row_index"), "row_index")
    assert twice.encode is encode
