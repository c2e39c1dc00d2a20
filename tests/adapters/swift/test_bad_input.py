"""Broken rows in ms-swift's own file format, through ``swift rlhf``: each stops the run naming its row and
field, or is left out and reported; rows in = rows training + rows reported skipped, none dropped unseen.

The file is checked before ms-swift reads it (its preprocessing deletes identical pairs with a traceback per
row, and its encoder swaps a row it cannot encode for another random row); what only the encoder shows (a row
longer than ``--max_length``, which ms-swift's default ``truncation_strategy: delete`` deletes) is left out by
the pre-scan and reported, named by its position in ms-swift's shuffled dataset and its question.
"""

from __future__ import annotations

import json

import pytest
from bad_input import BAD_INPUT, DEFECTS, SWIFT, break_rows, row_account, skipped_records, write_jsonl

pytest.importorskip("swift")

pytestmark = pytest.mark.reliability("ms-swift", row=BAD_INPUT)

SKIP_ALL = {"collation": {"default_policy": "skip"}}


def prompt_too_long(row):
    row["messages"][0]["content"] += " " + " ".join(["describe every detail"] * 300)


def dataset_with(swift_dataset_writer, tmp_path, defects, num_rows):
    good = swift_dataset_writer(tmp_path / "good" / "train.jsonl", num_rows)
    rows = [json.loads(line) for line in good.read_text().splitlines()]
    rows = break_rows(rows, {row: d for row, d in defects.items() if d in DEFECTS}, SWIFT, tmp_path / "img")
    for row, defect in defects.items():
        if defect == "prompt-too-long":
            prompt_too_long(rows[row])
    return write_jsonl(tmp_path / "data" / "train.jsonl", rows), rows


def with_config(tmp_path, plugin_file, config):
    path = tmp_path / "vlm_dpo.yaml"
    path.write_text(json.dumps(config))  # YAML reads JSON
    return {"extra_args": ["--external_plugins", plugin_file], "env_extra": {"VLM_DPO_CONFIG": str(path)}}


def test_a_corpus_of_every_defect_is_left_out_row_by_row_and_every_row_is_accounted_for(
    swift_dpo, swift_dataset_writer, plugin_file, qwen2_vl, tmp_path
):
    defects = dict(enumerate([*DEFECTS, "prompt-too-long"]))
    dataset, rows = dataset_with(swift_dataset_writer, tmp_path, defects, num_rows=len(defects) + 4)
    run = swift_dpo(qwen2_vl, dataset=dataset, max_steps=1, **with_config(tmp_path, plugin_file, SKIP_ALL))
    assert run.returncode == 0, run.tail()
    skipped = skipped_records(run.output_dir / "collation_report.jsonl")
    by_file = [record for record in skipped if record["origin"] == "file-check"]
    assert {record["row"] for record in by_file} == set(defects) - {len(DEFECTS)}, by_file
    for record in by_file:
        assert record["check"] in DEFECTS[defects[record["row"]]][1] and record["field"] and record["fix"], record
    (too_long,) = [record for record in skipped if record["origin"] == "scan"]
    question = rows[len(DEFECTS)]["messages"][0]["content"]
    assert too_long["check"] == "row-too-long" and repr(question[:60]) in too_long["message"], too_long
    output = run.stdout + run.stderr
    account = row_account(output, "ms-swift")
    assert account["rows_in"] == len(rows) and account["dropped"] == 0
    assert account["file_checks"] == len(DEFECTS) and account["prescan"] == 1
    assert account["training"] == len(rows) - len(defects)


@pytest.mark.parametrize(
    "defect, named",
    [
        ("identical", "[error] identical-pair (row 1, field 'rejected')"),
        ("image-corrupt", "[error] image-unreadable (row 1, field 'images[0]'): the image file"),
        ("response-not-assistant", "[error] malformed-row (row 1, field 'messages[1]'): the last message has role"),
    ],
)
def test_with_the_built_in_policies_a_broken_row_stops_before_swift_reads_the_file(
    swift_dpo, swift_dataset_writer, plugin_file, qwen2_vl, tmp_path, defect, named
):
    dataset, _ = dataset_with(swift_dataset_writer, tmp_path, {1: defect}, num_rows=4)
    run = swift_dpo(qwen2_vl, dataset=dataset, max_steps=1, extra_args=["--external_plugins", plugin_file])
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "failed for 1 row(s) before ms-swift loaded it: 1" in output, run.tail()
    assert named in output, run.tail()


def test_a_line_that_is_not_utf8_stops_the_run_naming_it_even_when_rows_may_be_skipped(
    swift_dpo, swift_dataset_writer, plugin_file, qwen2_vl, tmp_path
):
    dataset, _ = dataset_with(swift_dataset_writer, tmp_path, {}, num_rows=4)
    lines = dataset.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"assistant", b"assist\xffnt", 1)
    dataset.write_bytes(b"".join(lines))
    run = swift_dpo(qwen2_vl, dataset=dataset, max_steps=1, **with_config(tmp_path, plugin_file, SKIP_ALL))
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "[error] malformed-row (row 2): the line is not UTF-8" in output, run.tail()
    assert "ms-swift reads the file as a whole and fails on such a line" in output, run.tail()


def test_the_token_checks_read_swifts_processor_a_bos_inside_a_response_is_named(
    swift_dpo, swift_dataset_writer, plugin_file, llava, tmp_path
):
    """Swift hands over ``partial(template.data_collator, ...)``: the checks find the processor behind it, so the
    token-level checks (special tokens, image tokens, truncation) run on swift's encoded rows too."""
    dataset, rows = dataset_with(swift_dataset_writer, tmp_path, {}, num_rows=4)
    answer = rows[2]["messages"][1]["content"].split(" ")
    rows[2]["messages"][1]["content"] = " ".join([answer[0], "<s>", *answer[1:]])  # LLaVA's BOS, as text
    write_jsonl(dataset, rows)
    run = swift_dpo(llava, dataset=dataset, max_steps=1, extra_args=["--external_plugins", plugin_file])
    output = run.stdout + run.stderr
    assert run.returncode == 0, run.tail()  # a warning: the row trains, and the report names it
    report = [json.loads(line) for line in (run.output_dir / "collation_report.jsonl").read_text().splitlines()]
    # The pre-scan and the batch that trains the row each report it, under one position in swift's dataset.
    flagged = {(record["check"], record["row"], record["field"]) for record in report}
    assert len(report) == 2 and len(flagged) == 1, (report, run.tail())
    ((check, row, field),) = flagged
    assert (check, field) == ("special-token-misplaced", "chosen") and "in the response" in report[0]["message"]
    assert row in range(4), report  # a position in swift's dataset
    assert "special-token-misplaced" in output, run.tail()
