"""Hostile values in a preference file: each is a finding naming its row and field, never a traceback.

The same rows go through every reader of preference files: ``vlm-dpo doctor``, the file checks the
LLaMA-Factory and ms-swift adapters run before their framework loads the file (under the built-in
policies and under ``skip``), the live collation check of a raw row, and ``vlm-dpo train --data``'s loader.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from vlm_dpo_plugins.cli import main
from vlm_dpo_plugins.collation.checks import check_example_images
from vlm_dpo_plugins.collation.file_checks import check_file
from vlm_dpo_plugins.collation.policy import PairCheckError
from vlm_dpo_plugins.collation.report import ReportFile
from vlm_dpo_plugins.collation.settings import CollationConfig
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.preference_data.images import inspect, locate
from vlm_dpo_plugins.preference_data.pairs import ROW_FIX
from vlm_dpo_plugins.preference_data.scan import scan_file

LONG_NAME = "a" * 5000 + ".png"


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


# (image entry as the row holds it, the exact problem reported, or a prefix ending in "(")
NOT_A_BYTE = "the image's 'bytes' is a list whose item {} is {}, not a byte (0..255)"
HOSTILE_IMAGES = {
    "invalid base64": ({"bytes": "!!!not base64"}, "the image's 'bytes' is text but not valid base64 ("),
    "byte out of range": ({"bytes": [137, 80, 300]}, NOT_A_BYTE.format(2, 300)),
    "byte not an int": ({"bytes": [137, "P"]}, NOT_A_BYTE.format(1, "'P'")),
    "byte a boolean": ({"bytes": [True]}, NOT_A_BYTE.format(0, True)),
    "huge int bytes": (
        {"bytes": 10**400},
        "the image's 'bytes' is a JSON number (<an integer of 1329 bits>); expected base64 text or bytes",
    ),
    "empty bytes": ({"bytes": ""}, "the image's 'bytes' is empty"),
    "bytes not an image": ({"bytes": base64.b64encode(b"hello").decode()}, "the image bytes cannot be read as an "
                           "image ("),
    "path not a string": ({"path": 5}, "the image's 'path' is a JSON number (5), not a string"),
    "no path nor bytes": ({"id": 3}, "the image entry has neither 'bytes' nor 'path'"),
    "empty path": ("", "the image path is an empty string"),
    "blank path": ("  ", "the image path is blank"),
    "NaN": (math.nan, "the image entry is a JSON number (nan), neither a path nor {'path'/'bytes'}"),
    "boolean": (True, "the image entry is a JSON boolean (True), neither a path nor {'path'/'bytes'}"),
    "nested list": ([["x"]], "the image entry is a JSON array ([['x']]), neither a path nor {'path'/'bytes'}"),
}


def expected_file_problems(folder: Path) -> dict[str, tuple[object, str]]:
    """Entries naming files in ``folder``: paths the filesystem refuses, a folder, broken image files."""
    (folder / "pictures").mkdir()
    (folder / "truncated.png").write_bytes(png_bytes()[:-20])
    (folder / "empty.png").write_bytes(b"")
    long_shown = f"'...{str(folder / LONG_NAME)[-237:]}'"
    return {
        "name too long": (LONG_NAME, f"the image file {long_shown} cannot be reached (OSError: File name too long)"),
        "NUL in path": ("a\x00b.png", "the image path 'a\\x00b.png' contains a NUL character"),
        "a folder": ("pictures", f"the image file '{folder / 'pictures'}' is a folder, not an image file"),
        "truncated": ("truncated.png", f"the image file '{folder / 'truncated.png'}' cannot be read as an image ("),
        "zero bytes": ("empty.png", f"the image file '{folder / 'empty.png'}' is empty (0 bytes)"),
    }


def row(image: object) -> dict:
    return {"prompt": "<image>What is shown?", "chosen": "A red square.", "rejected": "A cat.", "images": [image]}


@pytest.fixture
def hostile_file(tmp_path):
    """A JSONL file: one row per hostile image entry, then rows that are not rows, then a good row."""
    (tmp_path / "good.png").write_bytes(png_bytes())
    cases = {**HOSTILE_IMAGES, **expected_file_problems(tmp_path)}
    lines = [json.dumps(row(entry)) for entry, _ in cases.values()]
    bad_lines = {
        "[" * 100_000 + "]" * 100_000: "the line cannot be read as JSON: its values are nested deeper than Python's "
        "parser allows",
        "1" * 5000: "the line cannot be read as JSON: it holds an integer too long to convert (",
        json.dumps([row("good.png")]): "the row is a JSON array ([{'chosen': 'A red square.', 'images'...), not an "
        "object",
        '"just text"': "the row is a JSON string ('just text'), not an object",
    }
    lines += list(bad_lines)
    lines.append(json.dumps(row({"path": "ignored.png", "bytes": base64.b64encode(png_bytes()).decode()})))
    path = tmp_path / "pairs.jsonl"
    # A byte-order mark before the first row is not part of it.
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    image_problems = {index: problem for index, (_, problem) in enumerate(cases.values())}
    row_problems = {len(cases) + index: problem for index, problem in enumerate(bad_lines.values())}
    return path, image_problems, row_problems


def assert_named(message: str, expected: str) -> None:
    assert message.startswith(expected) if expected.endswith("(") else message == expected, (message, expected)


def test_doctor_names_each_hostile_value_by_row_and_field(hostile_file):
    path, image_problems, row_problems = hostile_file
    report = scan_file(path)
    by_row = {finding.row: finding for finding in report.findings}
    assert set(by_row) == set(image_problems) | set(row_problems)  # the last row, bytes beside a path, is good
    for index, expected in image_problems.items():
        finding = by_row[index]
        assert (finding.code, finding.field, finding.severity.value) == ("image-unreadable", "images[0]", "error")
        assert_named(finding.message, expected)
        assert "drop the row" in finding.fix
    for index, expected in row_problems.items():
        finding = by_row[index]
        assert (finding.code, finding.field) == ("malformed-row", None)
        assert finding.message.startswith(expected.rstrip("(")), finding.message
    assert by_row[max(row_problems) - 1].fix == ROW_FIX


def test_the_doctor_command_exits_1_with_every_row_listed(hostile_file, capsys):
    path, image_problems, row_problems = hostile_file
    assert main(["doctor", "--data", str(path), "--all"]) == 1
    output = capsys.readouterr().out
    assert "[error] image-unreadable (row 0, field 'images[0]'): the image's 'bytes' is text but not valid" in output
    assert "[error] malformed-row (row 19): the line cannot be read as JSON: its values are nested deeper" in output
    assert f"FAIL: {len(image_problems) + len(row_problems)} error(s), 0 warning(s)" in output


def test_under_the_built_in_policies_the_file_checks_stop_naming_every_row(hostile_file, tmp_path):
    path, image_problems, row_problems = hostile_file
    with pytest.raises(PairCheckError) as error:
        check_file(path, CollationConfig(), framework="ms-swift", report=ReportFile(), report_path=tmp_path / "r")
    named = {(finding.row, finding.code, finding.field) for finding in error.value.findings}
    assert named == {(index, "image-unreadable", "images[0]") for index in image_problems} | {
        (index, "malformed-row", None) for index in row_problems
    }
    assert str(error.value).startswith(f"checks of {path} failed for 23 row(s) before ms-swift loaded it: 0, 1, 2")


def test_under_skip_image_problems_are_left_out_and_unparseable_lines_still_stop(hostile_file, tmp_path):
    path, image_problems, row_problems = hostile_file
    skip = CollationConfig(default_policy="skip")
    with pytest.raises(PairCheckError) as error:
        check_file(path, skip, framework="ms-swift", report=ReportFile(), report_path=tmp_path / "r.jsonl")
    message = str(error.value)
    # ms-swift parses the file as a whole: a line it cannot parse cannot be left out of it.
    assert "[error] malformed-row (row 19): the line cannot be read as JSON: its values are nested deeper" in message
    assert "ms-swift reads the file as a whole and fails on such a line, so the row cannot be left out" in message
    assert "Fix: simplify the line, or remove it, before ms-swift reads the file" in message
    assert "image-unreadable" not in message

    readable = tmp_path / "readable.jsonl"
    kept_lines = [line for index, line in enumerate(path.read_text("utf-8-sig").splitlines()) if index not in (19, 20)]
    readable.write_text("\n".join(kept_lines) + "\n")
    check = check_file(readable, skip, framework="ms-swift", report=ReportFile(), report_path=tmp_path / "r.jsonl")
    assert sorted(check.skipped) == sorted(image_problems) + [19, 20]  # renumbered: the array row, the string row
    assert check.kept == [21]
    for index, expected in image_problems.items():
        assert check.skipped[index].field == "images[0]"
        assert_named(check.skipped[index].message, expected)


@pytest.mark.parametrize("name", sorted(HOSTILE_IMAGES))
def test_each_entry_alone_is_total(name):
    entry, expected = HOSTILE_IMAGES[name]
    assert_named(inspect(locate(entry, (Path.cwd(),))).problem, expected)


def test_two_byte_images_are_checked_each(tmp_path):
    # Rows are dropped as the scan goes: an id() reused for other bytes must not hand over the first result.
    good = base64.b64encode(png_bytes()).decode()
    lines = [json.dumps(row({"bytes": good})), json.dumps(row({"bytes": base64.b64encode(b"junk").decode()}))]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines * 50) + "\n")
    report = scan_file(path)
    assert sorted({finding.row for finding in report.findings}) == list(range(1, 100, 2))


@pytest.mark.parametrize(
    "images, expected",
    [
        ("photo.png", "'images' is a str ('photo.png'); expected a list of images"),
        (7, "'images' is a int (7); expected a list of images"),
        ({"path": "photo.png"}, "'images' is a dict ({'path': 'photo.png'}); expected a list of images"),
    ],
)
def test_the_live_row_check_refuses_images_that_are_not_a_list(images, expected):
    [finding] = check_example_images({"images": images}, row=4)
    assert (finding.code, finding.row, finding.field, finding.message) == ("image-unreadable", 4, "images", expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[" * 100_000, "cannot be read as JSON: its values are nested deeper than Python's parser allows"),
        ("[" + "9" * 5000 + "]", "cannot be read as JSON: it holds an integer too long to convert"),
        ("{}", "holds a JSON object, not a list of rows"),
    ],
)
def test_a_json_file_beyond_the_parser_s_limits_is_a_config_error(tmp_path, text, expected, capsys):
    path = tmp_path / "pairs.json"
    path.write_text(text)
    assert main(["doctor", "--data", str(path)]) == 2
    assert f"vlm-dpo: error: preference data file '{path}' {expected}" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["folder", "long"])
def test_a_data_path_that_is_no_file_is_a_config_error(tmp_path, name):
    path = tmp_path / LONG_NAME.replace(".png", ".jsonl") if name == "long" else tmp_path
    expected = "cannot be reached (OSError: File name too long)" if name == "long" else "is a folder, not a file"
    with pytest.raises(ConfigError) as error:
        scan_file(path)
    assert str(error.value).startswith("preference data file ") and expected in str(error.value)


def test_the_train_data_loader_names_row_line_and_field(tmp_path):
    pytest.importorskip("datasets")
    from vlm_dpo_plugins.demo.data import load_preference_dataset

    (tmp_path / "pictures").mkdir()
    rows = [row(LONG_NAME), row("a\x00b.png"), row("pictures")]
    lines = [json.dumps(value) for value in rows] + ["[" * 100_000, json.dumps([row("x.png")])]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as error:
        load_preference_dataset(path)
    message = str(error.value)
    assert message.startswith(f"5 problem(s) in preference data file {path}:"), message
    assert "row 0 (line 1), field 'images[0]': the image file '..." in message
    assert ".png' cannot be reached (OSError: File name too long)" in message
    assert "row 1 (line 2), field 'images[0]': the image path 'a\\x00b.png' contains a NUL character" in message
    assert f"row 2 (line 3), field 'images[0]': the image file '{tmp_path / 'pictures'}' is a folder" in message
    assert "row 3 (line 4): the line cannot be read as JSON: its values are nested deeper" in message
    assert "row 4 (line 5): is a JSON array, not an object" in message
    assert len(message) < 3000  # the 5000-character name is not repeated whole
