"""The checked collation through ``vlm_dpo_collate``: error / skip / warn on the batch a collator builds,
re-collation without skipped rows, the report file, the dataset pre-scan, and other plugins' checks.

The collator here is a neutral stand-in with TRL's layout (2B rows, chosen first,
``completion_mask``, ``image_grid_thw``) that carries a duck-typed processor, so
these tests run in every environment; tests/core/test_collation_trl.py repeats the
acceptance case with TRL's own collator.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from vlm_dpo_plugins import hookimpl
from vlm_dpo_plugins.collation.policy import PairCheckError
from vlm_dpo_plugins.collation.wrapper import HookedCollator, keep_rows, scan_dataset
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import Finding, RunContext, Severity

PAD, BOS, EOS, IMAGE = 0, 1, 2, 9
WORDS = {10: " The", 11: " cat", 12: " dog", 13: " cow", 14: " hen", 20: "Q:", 21: " A:"}
PROCESSOR = SimpleNamespace(
    image_token_id=IMAGE,
    image_processor=SimpleNamespace(merge_size=2),
    tokenizer=SimpleNamespace(
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, all_special_ids=[PAD, BOS, EOS],
        decode=lambda ids: "".join(WORDS[token] for token in ids),
    ),
)


class TrlLayoutCollator:
    """Builds a TRL-layout batch from pre-tokenized examples, one 4-token (2x4x4 grid, merge 2) image each."""

    processor = PROCESSOR

    def __init__(self, max_length=None):
        self.max_length = max_length
        self.seen = []

    def __call__(self, examples):
        self.seen.append([dict(example) for example in examples])
        rows, masks = [], []
        for side in ("chosen", "rejected"):
            for example in examples:
                prompt = [BOS, IMAGE, IMAGE, IMAGE, IMAGE, 20, 21] if example["images"] else [BOS, 20, 21]
                rows.append(prompt + example[side])
                masks.append([0] * len(prompt) + [1] * len(example[side]))
        if self.max_length:
            rows, masks = [r[: self.max_length] for r in rows], [m[: self.max_length] for m in masks]
        width = max(len(row) for row in rows)
        batch = {
            "input_ids": torch.tensor([row + [PAD] * (width - len(row)) for row in rows]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
            "completion_mask": torch.tensor([mask + [0] * (width - len(mask)) for mask in masks]),
        }
        images = sum(len(example["images"]) for example in examples)
        if images:
            batch["image_grid_thw"] = torch.tensor([[1, 4, 4]] * (2 * images))
        return batch


IN_MEMORY_IMAGE = SimpleNamespace(size=(56, 56))  # like a PIL image: nothing to open


def example(chosen, rejected, row=None, images=(IN_MEMORY_IMAGE,)):
    found = {"chosen": list(chosen), "rejected": list(rejected), "images": list(images)}
    if row is not None:
        found["row_index"] = row
    return found


GOOD = [example([10, 11, EOS], [10, 12, EOS]), example([10, 13, EOS], [10, 14, EOS])]
IDENTICAL = example([10, 12, EOS], [10, 12, EOS])


def configured(tmp_path, **collation):
    manager = create_plugin_manager(load_entry_points=False)
    manager.hook.vlm_dpo_configure(config=manager.load_config({"collation": collation}))
    manager.hook.vlm_dpo_train_begin(model=torch.nn.Linear(1, 1), context=RunContext("test", output_dir=str(tmp_path)))
    return manager


def report_lines(tmp_path):
    return [json.loads(line) for line in (tmp_path / "collation_report.jsonl").read_text().splitlines()]


def batch_of_identical_pairs():
    # Dataset rows 100..103; rows 101 and 103 have chosen == rejected.
    return [
        example([10, 11, EOS], [10, 12, EOS], row=100), example([10, 12, EOS], [10, 12, EOS], row=101),
        example([10, 13, EOS], [10, 14, EOS], row=102), example([10, 14, EOS], [10, 14, EOS], row=103),
    ]


# ---------------------------------------------------------------------------
# acceptance: chosen == rejected under warn, skip and error
# ---------------------------------------------------------------------------


def test_identical_pairs_under_warn_are_reported_with_their_rows_and_kept(tmp_path, caplog):
    manager = configured(tmp_path, policy={"identical-pair": "warn"})
    collate = TrlLayoutCollator()
    with caplog.at_level(logging.WARNING, logger="vlm_dpo_plugins.collation"):
        batch = HookedCollator(manager, collate)(batch_of_identical_pairs())
    assert batch["input_ids"].shape[0] == 8  # all four pairs kept
    assert len(collate.seen) == 1  # collated once: nothing to rebuild
    warned = [record.getMessage() for record in caplog.records if record.name == "vlm_dpo_plugins.collation"]
    assert [m.split(":")[0] for m in warned] == ["kept (row 101)", "kept (row 103)"]
    assert "identical-pair (row 101, field 'rejected')" in warned[0]
    assert [(line["row"], line["action"], line["check"]) for line in report_lines(tmp_path)] == [
        (101, "warn", "identical-pair"), (103, "warn", "identical-pair"),
    ]
    metrics = {key: value for entry in manager.hook.vlm_dpo_metrics(step=1) for key, value in entry.items()}
    assert (metrics["collation/warned_rows"], metrics["collation/skipped_rows"]) == (2.0, 0.0)


def test_identical_pairs_under_skip_are_dropped_counted_and_listed_in_the_report(tmp_path):
    manager = configured(tmp_path, policy={"identical-pair": "skip"})
    collate = TrlLayoutCollator()
    examples = batch_of_identical_pairs()
    batch = HookedCollator(manager, collate)(examples)
    # The batch is what the framework's collator builds for the two remaining rows, exactly.
    expected = TrlLayoutCollator()([examples[0], examples[2]])
    assert batch.keys() == expected.keys()
    assert all(torch.equal(batch[key], expected[key]) for key in batch)
    plugin = manager.get_plugin("collation")
    assert plugin.summary.skipped_rows == {101, 103}
    assert [(line["row"], line["action"], line["check"], line["field"]) for line in report_lines(tmp_path)] == [
        (101, "skip", "identical-pair", "rejected"), (103, "skip", "identical-pair", "rejected"),
    ]
    metrics = {key: value for entry in manager.hook.vlm_dpo_metrics(step=1) for key, value in entry.items()}
    assert metrics["collation/skipped_rows"] == 2.0
    # The row index never reaches the framework's collator.
    assert all("row_index" not in row for call in collate.seen for row in call)


def test_identical_pairs_under_error_raise_naming_every_row(tmp_path):
    manager = configured(tmp_path)  # identical-pair defaults to error
    with pytest.raises(PairCheckError) as raised:
        HookedCollator(manager, TrlLayoutCollator())(batch_of_identical_pairs())
    message = str(raised.value)
    assert message.splitlines()[0] == "collation checks failed for 2 row(s): 101, 103"
    assert "[error] identical-pair (row 101, field 'rejected')" in message
    assert "[error] identical-pair (row 103, field 'rejected')" in message
    assert "collation.policy.<check> (identical-pair) to 'skip'" in message
    assert raised.value.rows == [101, 103]
    assert not (tmp_path / "collation_report.jsonl").exists()  # errors are raised, not filed


# ---------------------------------------------------------------------------
# the rest of the flow
# ---------------------------------------------------------------------------


def test_rows_without_an_index_are_counted_across_batches(tmp_path):
    manager = configured(tmp_path, policy={"identical-pair": "skip"})
    collate = TrlLayoutCollator()
    HookedCollator(manager, collate)(list(GOOD))
    HookedCollator(manager, collate)([GOOD[0], IDENTICAL, GOOD[1]])
    assert manager.get_plugin("collation").summary.skipped_rows == {3}


def test_a_prompt_cut_inside_its_image_is_skipped_and_the_rest_rebuilt(tmp_path):
    # max_length=4 keeps row 0 (no image) distinguishable and cuts row 1 after 3 of its 4 image tokens.
    manager = configured(tmp_path, policy={"image-tokens-truncated": "skip"})
    rows = [example([11, EOS], [12, EOS], images=()), example([10, 13, EOS], [10, 14, EOS])]
    collate = TrlLayoutCollator(max_length=4)
    batch = HookedCollator(manager, collate)(rows)
    assert manager.get_plugin("collation").summary.skipped_rows == {1}
    assert "image_grid_thw" not in batch and batch["input_ids"].shape[0] == 2
    (line,) = [line for line in report_lines(tmp_path) if line["field"] == "chosen"]
    assert line["check"] == "image-tokens-truncated" and "its 1 image(s) need 4" in line["message"]


def test_a_missing_image_is_caught_before_the_collator_opens_it(tmp_path):
    manager = configured(tmp_path)
    rows = [example([10, 11, EOS], [10, 12, EOS], images=[str(tmp_path / "gone.png")], row=8)]
    collate = TrlLayoutCollator()
    with pytest.raises(PairCheckError, match=r"image-unreadable \(row 8, field 'images\[0\]'\)"):
        HookedCollator(manager, collate)(rows)
    assert collate.seen == []


def test_a_row_the_collator_raises_on_is_named_and_can_be_skipped(tmp_path):
    class Strict(TrlLayoutCollator):
        def __call__(self, examples):
            if any(not example["chosen"] for example in examples):
                raise ValueError("Number of images provided (1) does not match number of image placeholders (0).")
            return super().__call__(examples)

    rows = [GOOD[0], example([], [10, 12, EOS], row=5), GOOD[1]]
    with pytest.raises(PairCheckError, match=r"collate-failed \(row 5, field 'row'\).*does not match number") as raised:
        HookedCollator(configured(tmp_path), Strict())(rows)
    assert isinstance(raised.value.__cause__, ValueError)
    skipping = configured(tmp_path, policy={"collate-failed": "skip"})
    assert HookedCollator(skipping, Strict())(rows)["input_ids"].shape[0] == 4


def test_when_every_row_of_a_batch_fails_alone_each_is_named(tmp_path):
    class Strict(TrlLayoutCollator):
        def __call__(self, examples):
            if any(not example["chosen"] for example in examples):
                raise ValueError("Number of images provided (2) does not match number of image placeholders (1).")
            return super().__call__(examples)

    rows = [example([], [10, 12, EOS], row=3), example([], [10, 13, EOS], row=4)]
    with pytest.raises(PairCheckError) as raised:
        HookedCollator(configured(tmp_path), Strict())(rows)
    assert "collate-failed (row 3, field 'row')" in str(raised.value)
    assert "collate-failed (row 4, field 'row')" in str(raised.value)


def test_a_batch_left_empty_by_skips_raises_instead_of_training_on_nothing(tmp_path):
    manager = configured(tmp_path, policy={"identical-pair": "skip"})
    with pytest.raises(PairCheckError, match="all 1 pair\\(s\\) of this batch were skipped"):
        HookedCollator(manager, TrlLayoutCollator())([IDENTICAL])


def test_off_and_disabled_pass_the_batch_through(tmp_path):
    off = configured(tmp_path, policy={"identical-pair": "off"})
    assert HookedCollator(off, TrlLayoutCollator())([IDENTICAL])["input_ids"].shape[0] == 2
    disabled = configured(tmp_path, enabled=False)
    collate = TrlLayoutCollator()
    HookedCollator(disabled, collate)([dict(IDENTICAL, row_index=4)])
    assert "row_index" not in collate.seen[0][0]


def test_the_prescan_collects_every_problem_without_raising(tmp_path):
    manager = configured(tmp_path, policy={"near-identical-pair": "skip"})
    dataset = [GOOD[0], IDENTICAL, GOOD[1], example([10, 11, EOS], [EOS]), GOOD[0]]
    summary = scan_dataset(manager, dataset, TrlLayoutCollator(), batch_size=2, output_dir=str(tmp_path / "scan"))
    assert summary.rows_checked == 5
    assert [(f.code, f.row) for f in summary.errors] == [("identical-pair", 1), ("empty-response", 3)]
    assert keep_rows(5, summary) == [0, 2, 4]
    with pytest.raises(PairCheckError, match="collation checks failed for 2 row\\(s\\): 1, 3"):
        summary.raise_for_errors()
    assert "5 row(s) checked, 2 error(s), 0 row(s) skipped" in str(summary)
    # The scan is not the run: training-time counters stay at zero.
    assert manager.get_plugin("collation").summary.rows_checked == 0


def test_checks_from_another_plugin_run_inside_the_collation(tmp_path):
    class NoDogs:
        @hookimpl
        def vlm_dpo_check_pair(self, pair):
            if 12 in pair.chosen.input_ids:
                return [Finding("dog-chosen", Severity.WARNING, "a dog was chosen", row=pair.row, field="chosen")]
            return []

    manager = create_plugin_manager(load_entry_points=False, extra_plugins={"no_dogs": NoDogs()})
    manager.hook.vlm_dpo_configure(config=manager.load_config({"collation": {"report_path": str(tmp_path / "r.jsonl")}}))
    collator = HookedCollator(manager, TrlLayoutCollator())
    assert collator.max_length is None  # attributes of the framework's collator stay readable
    collator([example([10, 12, EOS], [10, 11, EOS])])
    (line,) = [json.loads(text) for text in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert (line["check"], line["action"], line["row"]) == ("dog-chosen", "warn", 0)
