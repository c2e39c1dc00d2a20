"""``SwiftRows``: swift's lazily encoding training set, rebuilt after the pre-scan with each row's position."""

from __future__ import annotations

import pytest

pytest.importorskip("swift", reason="needs the ms-swift test environment (ms-swift==4.6.0)")

from datasets import Dataset  # noqa: E402
from swift.dataset import LazyLLMDataset  # noqa: E402

from vlm_dpo_plugins.adapters.swift.trainer import SwiftRows  # noqa: E402
from vlm_dpo_plugins.collation.pairs import IMAGE_COUNT_KEY  # noqa: E402


def encode(row, return_length=False):
    assert "row_index" not in row, "swift's encoder must never see the plugins' key"
    return {"chosen_input_ids": [len(row["question"])], "length": 1}


@pytest.mark.parametrize("user_column", [False, True])
def test_kept_rows_carry_their_position_and_image_count_into_every_batch(user_column):
    columns = {"question": ["a", "bb", "ccc"], "images": [["x.png"], [], ["y.png", "z.png"]]}
    if user_column:
        columns["row_index"] = [100, 101, 102]  # a column named like the plugins' own: the positions replace it
    rows = SwiftRows(LazyLLMDataset(Dataset.from_dict(columns), encode), "row_index")

    kept = rows.kept([1])
    assert isinstance(kept, LazyLLMDataset) and len(kept) == 2
    assert [(kept[i]["row_index"], kept[i][IMAGE_COUNT_KEY]) for i in range(2)] == [(0, 1), (2, 2)]
    everything = rows.kept([])  # rebuilt even when nothing was left out
    assert [everything[i]["row_index"] for i in range(3)] == [0, 1, 2]
