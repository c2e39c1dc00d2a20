"""Broken rows in LLaMA-Factory's own file format, through ``llamafactory-cli train``: each stops the run
naming its row and field, or is left out and reported; rows in = rows training + rows reported skipped.

The file is checked before LLaMA-Factory loads it (its preprocessing would crash on a missing image and drop a
malformed conversation with a warning); what only the tokens show (a prompt past ``cutoff_len`` cutting image
tokens) is left out by the collation pre-scan, named by the row of the file.
"""

from __future__ import annotations

import pytest
from bad_input import BAD_INPUT, DEFECTS, LLAMAFACTORY, break_rows, row_account, skipped_records, write_jsonl
from llamafactory_runs import DATASET_NAME, IMAGE_PLACEHOLDER, write_dataset

pytest.importorskip("llamafactory")

pytestmark = pytest.mark.reliability("LLaMA-Factory", row=BAD_INPUT)

CUTOFF_LEN = 96


def prompt_too_long(row):
    """A prompt far past cutoff_len with long responses: LLaMA-Factory's infer_seqlen gives each side
    int(cutoff_len * response / (prompt + response)) tokens, which here is none."""
    row["conversations"][-1]["value"] = IMAGE_PLACEHOLDER + " ".join(["describe every detail"] * 1500)
    for side in ("chosen", "rejected"):
        row[side]["value"] = " ".join([row[side]["value"]] * 12)


def dataset_with(tmp_path, defects, num_rows):
    """A JSONL copy of the tiny sharegpt dataset with ``defects`` applied, and its dataset_info.json."""
    good = tmp_path / "good"
    write_dataset(good, num_rows=num_rows)
    rows = [{**row, "images": [str(good / path) for path in row["images"]]} for row in _rows(good)]
    rows = break_rows(rows, {row: d for row, d in defects.items() if d in DEFECTS}, LLAMAFACTORY, tmp_path / "img")
    for row, defect in defects.items():
        if defect == "prompt-too-long":
            prompt_too_long(rows[row])
    folder = tmp_path / "data"
    write_dataset(folder, rows=rows)  # the JSON file and the dataset_info.json entry
    (folder / f"{DATASET_NAME}.json").unlink()
    write_jsonl(folder / f"{DATASET_NAME}.jsonl", rows)
    info = (folder / "dataset_info.json").read_text().replace(f"{DATASET_NAME}.json", f"{DATASET_NAME}.jsonl")
    (folder / "dataset_info.json").write_text(info)
    return folder, rows


def _rows(folder):
    import json

    return json.loads((folder / f"{DATASET_NAME}.json").read_text())


def test_a_corpus_of_every_defect_is_left_out_row_by_row_and_every_row_is_accounted_for(llamafactory_dpo, tmp_path):
    defects = dict(enumerate([*DEFECTS, "prompt-too-long"]))
    folder, rows = dataset_with(tmp_path, defects, num_rows=len(defects) + 3)
    run = llamafactory_dpo(
        "llava",
        dataset_dir=folder,
        max_steps=1,
        cutoff_len=CUTOFF_LEN,
        vlm_dpo={"collation": {"default_policy": "skip"}},
    )
    assert run.returncode == 0, run.log()
    skipped = skipped_records(run.output_dir / "collation_report.jsonl")
    assert {record["row"] for record in skipped} == set(defects), skipped
    for record in skipped:
        defect = defects[record["row"]]
        # LLaMA-Factory hands over the truncated pair only: no response token left reads as a masked response.
        expected = DEFECTS[defect][1] if defect in DEFECTS else {"response-masked"}
        assert record["check"] in expected and record["field"] and record["fix"], record
    account = row_account(run.output, "LLaMA-Factory")
    assert account["rows_in"] == len(rows) and account["dropped"] == 0
    assert account["file_checks"] == len(DEFECTS) and account["prescan"] == 1
    assert account["training"] + len({record["row"] for record in skipped}) == len(rows)


@pytest.mark.parametrize(
    "defect, named",
    [
        ("image-zero-byte", "[error] image-unreadable (row 2, field 'images[0]'): the image file"),
        ("wrong-prompt-role", "[error] malformed-row (row 2, field 'conversations[0]'): the prompt ends with a "),
        ("identical", "[error] identical-pair (row 2, field 'rejected')"),
    ],
)
def test_with_the_built_in_policies_a_broken_row_stops_before_llamafactory_loads_the_file(
    llamafactory_dpo, tmp_path, defect, named
):
    folder, _ = dataset_with(tmp_path, {2: defect}, num_rows=4)
    run = llamafactory_dpo("llava", dataset_dir=folder, max_steps=1)
    assert run.returncode != 0
    assert "failed for 1 row(s) before LLaMA-Factory loaded it: 2" in run.output, run.log()
    assert named in run.output, run.log()
    assert "Running tokenizer on dataset" not in run.output, "stopped before LLaMA-Factory's preprocessing"


def test_a_line_that_is_not_utf8_stops_the_run_naming_it_even_when_rows_may_be_skipped(llamafactory_dpo, tmp_path):
    folder, _ = dataset_with(tmp_path, {}, num_rows=4)
    path = folder / f"{DATASET_NAME}.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"gpt", b"gp\xff", 1)
    path.write_bytes(b"".join(lines))
    run = llamafactory_dpo("llava", dataset_dir=folder, max_steps=1, vlm_dpo={"collation": {"default_policy": "skip"}})
    assert run.returncode != 0
    assert "[error] malformed-row (row 1): the line is not UTF-8" in run.output, run.log()
    assert "LLaMA-Factory reads the file as a whole and fails on such a line" in run.output, run.log()
