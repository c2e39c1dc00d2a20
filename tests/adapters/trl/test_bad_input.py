"""Broken preference pairs inside ``VLMDPOTrainer.train()``: each is stopped by an error naming its row and field,
or left out and reported; never dropped in silence, never trained on.

A fixed corpus (one defect per kind) and hypothesis-generated datasets (any mix of defects at any rows) in TRL's
conversational vision format. With every check set to ``skip``, the rows in always equal the rows trained plus
the rows reported skipped, and the rows reported are exactly the broken ones; with the built-in policies, the
first broken row stops the run before step 0 with its row and field named.
"""

from __future__ import annotations

import copy
import json

import pytest

pytest.importorskip("trl")

from bad_input import BAD_INPUT  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from trl_runs import make_trainer  # noqa: E402

from vlm_dpo_plugins.errors import VLMDPOError  # noqa: E402

pytestmark = pytest.mark.reliability("TRL", row=BAD_INPUT)


def _text(row, side):
    return row[side][0]["content"][0]["text"]


def _set_text(row, side, text):
    row[side][0]["content"][0]["text"] = text


def identical(row):
    _set_text(row, "rejected", _text(row, "chosen"))


def whitespace_only(row):
    _set_text(row, "rejected", _text(row, "chosen").replace(" ", "  ", 1) + " ")


def empty_chosen(row):
    _set_text(row, "chosen", "")


def blank_rejected(row):
    _set_text(row, "rejected", "   ")


def prompt_too_long(row):
    question = row["prompt"][0]["content"][1]
    question["text"] = " ".join([question["text"]] * 40)  # past max_length: nothing of the responses is left


def image_missing(row):
    row["images"] = []


def image_extra(row):
    row["images"] = [row["images"][0], row["images"][0]]


DEFECTS = {
    "identical": (identical, {"identical-pair"}),
    "whitespace-only": (whitespace_only, {"near-identical-pair"}),
    "empty-chosen": (empty_chosen, {"empty-response"}),
    "blank-rejected": (blank_rejected, {"empty-response"}),
    "prompt-too-long": (prompt_too_long, {"response-truncated", "image-tokens-truncated"}),
    "image-missing": (image_missing, {"image-count-mismatch", "collate-failed"}),
    "image-extra": (image_extra, {"image-count-mismatch", "collate-failed"}),
}
MAX_LENGTH = 96


def broken_rows(preference_rows, defects: dict[int, str]) -> list[dict]:
    rows = copy.deepcopy(preference_rows)
    for row, defect in defects.items():
        DEFECTS[defect][0](rows[row])
    return rows


def train_skipping_everything(model_dir, rows, output_dir):
    config = {"collation": {"default_policy": "skip"}}
    trainer = make_trainer(model_dir, rows, output_dir, max_steps=1, max_length=MAX_LENGTH, vlm_dpo_config=config)
    trainer.train()
    report = output_dir / "collation_report.jsonl"
    records = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    return trainer, [record for record in records if record["action"] == "skip"]


def assert_accounted_for(trainer, skipped, rows, defects):
    skipped_rows = {record["row"] for record in skipped}
    trained_rows = set(trainer.train_dataset["row_index"])
    assert skipped_rows == set(defects), (skipped, defects)
    assert len(rows) == len(trained_rows) + len(skipped_rows) and not trained_rows & skipped_rows
    for record in skipped:
        assert record["check"] in DEFECTS[defects[record["row"]]][1], record
        assert record["field"] and record["fix"], record


def test_a_corpus_of_every_defect_is_skipped_row_by_row_and_counted(tiny_model_dirs, preference_rows, tmp_path):
    defects = dict(enumerate(DEFECTS))
    rows = broken_rows(preference_rows, defects)
    trainer, skipped = train_skipping_everything(tiny_model_dirs["llava"], rows, tmp_path)
    assert_accounted_for(trainer, skipped, rows, defects)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(defects=st.dictionaries(st.integers(0, 15), st.sampled_from(sorted(DEFECTS)), max_size=6))
def test_any_mix_of_defects_is_accounted_for(tiny_model_dirs, preference_rows, tmp_path_factory, defects):
    rows = broken_rows(preference_rows, defects)
    trainer, skipped = train_skipping_everything(tiny_model_dirs["llava"], rows, tmp_path_factory.mktemp("run"))
    assert_accounted_for(trainer, skipped, rows, defects)


@pytest.mark.parametrize(
    "defect, named",
    [
        ("identical", "[error] identical-pair (row 7, field 'rejected')"),
        ("empty-chosen", "[error] empty-response (row 7, field 'chosen')"),
        ("blank-rejected", "[error] empty-response (row 7, field 'rejected')"),
        (
            "image-missing",
            "[error] collate-failed (row 7, field 'row'): the framework's collator raised on this row "
            "alone: ValueError: Number of images provided (0) does not match number of image placeholders (1)",
        ),
        (
            "image-extra",
            "[error] collate-failed (row 7, field 'row'): the framework's collator raised on this row "
            "alone: ValueError: Number of images provided (2) does not match number of image placeholders (1)",
        ),
    ],
)
def test_with_the_built_in_policies_a_broken_row_stops_the_run_naming_row_and_field(
    tiny_model_dirs, preference_rows, tmp_path, defect, named
):
    rows = broken_rows(preference_rows, {7: defect})
    trainer = make_trainer(tiny_model_dirs["llava"], rows, tmp_path, max_steps=1, max_length=MAX_LENGTH)
    with pytest.raises(VLMDPOError) as error:
        trainer.train()
    assert str(error.value).startswith("collation checks failed for 1 row(s): 7"), str(error.value)
    assert named in str(error.value), str(error.value)
    assert trainer.state.global_step == 0, "stopped before step 0"


def test_a_dataset_with_every_row_skipped_stops_instead_of_training_on_nothing(
    tiny_model_dirs, preference_rows, tmp_path
):
    rows = broken_rows(preference_rows, dict.fromkeys(range(len(preference_rows)), "identical"))
    with pytest.raises(VLMDPOError, match=r"the collation checks left out every one of the 16 training rows"):
        train_skipping_everything(tiny_model_dirs["llava"], rows, tmp_path)
