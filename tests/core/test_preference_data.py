"""The one reader of preference rows and the one image check that doctor, the file checks and collation share."""

from __future__ import annotations

import base64
import json
from io import BytesIO

import pytest
from PIL import Image

from vlm_dpo_plugins.collation.checks import check_example_images
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.preference_data.images import check_images, inspect, locate
from vlm_dpo_plugins.preference_data.rows import BadRow, read_rows
from vlm_dpo_plugins.preference_data.scan import scan_file

ROW = {"prompt": "<image>What colour?", "chosen": "Red.", "rejected": "Blue.", "images": ["a.png"]}


def png_bytes(size=(6, 4)) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG")
    return buffer.getvalue()


# -- rows ------------------------------------------------------------------------------------------------------


def test_jsonl_bad_lines_are_rows_numbered_in_place_and_blank_lines_are_not(tmp_path):
    good = json.dumps(ROW).encode()
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + good + b"\n"  # a byte-order mark on the first line is not a defect
        + b"\n"
        + good.replace(b"colour", b"col\xf6ur") + b"\n"
        + b'{"prompt": "cut off\n'
        + good + b"\n"
    )
    rows = list(read_rows(path))
    assert [(row.index, row.line) for row in rows] == [(0, 1), (1, 3), (2, 4), (3, 5)]
    assert rows[0].value == rows[3].value == ROW
    assert rows[1].value == BadRow(
        "the line is not UTF-8 (invalid start byte at byte 27)", "re-encode the line as UTF-8, or remove it"
    )
    assert rows[2].value.reason.startswith("the line is not valid JSON (") and "column" in rows[2].value.reason


def test_a_json_list_is_read_whole_and_its_errors_are_errors_of_the_file(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([ROW, ROW]))
    assert [(row.index, row.line, row.value) for row in read_rows(path)] == [(0, None, ROW), (1, None, ROW)]
    path.write_bytes(json.dumps([ROW]).encode().replace(b"colour", b"col\xf6ur"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 \(invalid start byte at byte \d+\)\. Fix: save it as UTF-8"):
        list(read_rows(path))
    path.write_text(json.dumps(ROW))
    with pytest.raises(ConfigError, match="holds a JSON object, not a list of rows"):
        list(read_rows(path))


def test_a_missing_file_and_an_unknown_extension_fail_before_any_row(tmp_path):
    with pytest.raises(ConfigError, match="preference data file not found: tried"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "pairs.csv").write_text("prompt,chosen\n")
    with pytest.raises(ConfigError, match="unsupported extension '.csv'"):
        read_rows(tmp_path / "pairs.csv")


# -- images ----------------------------------------------------------------------------------------------------


def test_every_kind_of_entry_resolves_and_is_checked(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    (second / "a.png").write_bytes(png_bytes())
    (first / "empty.png").write_bytes(b"")
    (first / "text.png").write_text("not an image")
    roots = (first, second)

    def problem(entry, verify=True):
        return inspect(locate(entry, roots), verify=verify).problem

    assert locate("a.png", roots).path == second / "a.png"  # the first root that holds it
    assert inspect(locate("a.png", roots)).size == (6, 4)
    assert problem(str(second / "a.png")) is None and problem({"path": "a.png"}) is None
    assert problem({"bytes": png_bytes()}) is None and problem(png_bytes()) is None
    assert problem({"bytes": base64.b64encode(png_bytes()).decode()}) is None  # base64 text, as JSON holds it
    assert problem("https://example.com/a.png") is None  # URLs are not fetched before training
    assert problem(Image.new("RGB", (2, 2))) is None  # decoded in memory: trusted
    assert problem("gone.png") == f"the image file '{first / 'gone.png'}' does not exist"
    assert problem("empty.png") == f"the image file '{first / 'empty.png'}' is empty (0 bytes)"
    assert problem("text.png").startswith(f"the image file '{first / 'text.png'}' cannot be read as an image (")
    assert problem("text.png", verify=False) is None  # existence only
    assert problem({"bytes": b"junk"}).startswith("the image bytes cannot be read as an image (")
    assert problem(None) == "the image is None"
    assert problem({"id": 3}) == "the image entry has neither 'bytes' nor 'path'"
    assert problem(7) == "the image entry is a JSON number (7), neither a path nor {'path'/'bytes'}"


def test_each_distinct_file_is_opened_once(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    targets = {}
    for entry in ("a.png", str(tmp_path / "a.png"), {"path": "a.png"}, "b.png"):
        target = locate(entry, (tmp_path,))
        targets.setdefault(target.key, target)
    ticks = []
    results = check_images(targets, workers=2, progress=ticks.append)
    present, absent = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    assert sorted(results) == [present, absent] and len(ticks) == 2
    assert results[present].problem is None and "does not exist" in results[absent].problem


# -- one behaviour for every reader ----------------------------------------------------------------------------


def test_doctor_s_scan_and_the_live_collation_check_say_the_same_about_an_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(png_bytes()[:30])
    rows = [dict(ROW, images=[str(tmp_path / "broken.png")]), dict(ROW, images=[str(tmp_path / "gone.png")])]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    scanned = scan_file(path).findings
    live = [finding for row, data in enumerate(rows) for finding in check_example_images(data, row)]
    assert {finding.code for finding in scanned + live} == {"image-unreadable"}
    assert [(f.row, f.field, f.message) for f in scanned] == [(f.row, f.field, f.message) for f in live]
    assert len(live) == 2


def test_a_bad_line_is_one_bad_row_and_the_rows_after_it_are_checked(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    good = json.dumps(ROW).encode()
    identical = json.dumps(dict(ROW, rejected="Red.")).encode()
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join([good, good.replace(b"colour", b"col\xf6ur"), b"{not json", identical]) + b"\n")
    report = scan_file(path)
    assert report.rows == 4 and report.unreadable_rows == {1, 2}
    found = [(f.row, f.code) for f in report.findings]
    assert found == [(1, "malformed-row"), (2, "malformed-row"), (3, "identical-pair")]
    assert report.findings[0].message.startswith("the line is not UTF-8")
    assert report.findings[0].fix == "re-encode the line as UTF-8, or remove it"


def test_the_llamafactory_columns_the_reader_reads_and_those_it_does_not():
    from vlm_dpo_plugins.preference_data.pairs import why_llamafactory_columns_are_unread

    sharegpt = {
        "messages": "conversations",
        "chosen": "chosen",
        "rejected": "rejected",
        "images": "images",
        "role_tag": "from",
        "content_tag": "value",
        "user_tag": "human",
        "assistant_tag": "gpt",
    }
    assert why_llamafactory_columns_are_unread("sharegpt", sharegpt) is None
    assert why_llamafactory_columns_are_unread("sharegpt", {**sharegpt, "user_tag": "person"}) == (
        "its columns or role names are its own"
    )
    alpaca = {"prompt": "instruction", "query": None, "chosen": "chosen", "rejected": "rejected", "images": None}
    assert why_llamafactory_columns_are_unread("alpaca", alpaca) is None
    assert why_llamafactory_columns_are_unread("alpaca", {**alpaca, "prompt": "question"}) is not None
    assert why_llamafactory_columns_are_unread("openai", {}) == "its formatting is 'openai'"
