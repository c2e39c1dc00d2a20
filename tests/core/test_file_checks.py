"""The raw-file checks the LLaMA-Factory and ms-swift adapters run before their framework reads a file.

Every defect of the bad-input corpus, in both frameworks' file formats, alone and in any mix (hypothesis):
with every check set to ``skip`` the rows kept plus the rows reported skipped are the rows in, and the rows
reported are exactly the broken ones; with the built-in policies the run stops naming row, field and fix; a
line that is not UTF-8 stops it whatever the policy (the framework's loader reads the file as a whole).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from bad_input import DEFECTS, LLAMAFACTORY, SWIFT, break_rows, skipped_records, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlm_dpo_plugins.collation.accounting import RowAccount
from vlm_dpo_plugins.collation.file_checks import ORIGIN, check_file
from vlm_dpo_plugins.collation.policy import PairCheckError
from vlm_dpo_plugins.collation.report import CollationSummary, ReportFile
from vlm_dpo_plugins.collation.settings import CollationConfig
from vlm_dpo_plugins.collation.wrapper import keep_rows
from vlm_dpo_plugins.tiny.data import make_preference_examples, write_preference_images
from vlm_dpo_plugins.types import Finding, Severity

ROWS = 14
SKIP_ALL = CollationConfig(default_policy="skip")


def llamafactory_rows(examples, images):
    return [
        {
            "conversations": [{"from": "human", "value": f"<image>{example.prompt}"}],
            "chosen": {"from": "gpt", "value": example.chosen},
            "rejected": {"from": "gpt", "value": example.rejected},
            "images": [str(image)],
        }
        for example, image in zip(examples, images, strict=True)
    ]


def swift_rows(examples, images):
    return [
        {
            "messages": [
                {"role": "user", "content": f"<image>{example.prompt}"},
                {"role": "assistant", "content": example.chosen},
            ],
            "rejected_response": example.rejected,
            "images": [str(image)],
        }
        for example, image in zip(examples, images, strict=True)
    ]


FORMATS = {"llamafactory": (LLAMAFACTORY, llamafactory_rows), "swift": (SWIFT, swift_rows)}


@pytest.fixture(scope="module")
def good_rows(tmp_path_factory):
    examples = make_preference_examples(ROWS, seed=3)
    images = write_preference_images(examples, tmp_path_factory.mktemp("images"))
    return {name: make(examples, images) for name, (_, make) in FORMATS.items()}


def run_checks(folder: Path, rows: list[dict], config: CollationConfig, **kwargs):
    report = folder / "collation_report.jsonl"
    check = check_file(
        write_jsonl(folder / "train.jsonl", rows),
        config,
        framework="the framework",
        report=ReportFile(),
        report_path=report,
        **kwargs,
    )
    return check, skipped_records(report)


def assert_accounted_for(check, skipped, defects):
    assert set(check.skipped) == set(defects), (check.skipped, defects)
    assert len(check.kept) + len(check.skipped) == check.rows == ROWS
    assert {record["row"] for record in skipped} == set(defects)
    for record in skipped:
        assert record["check"] in DEFECTS[defects[record["row"]]][1], record
        assert record["field"] and record["fix"] and record["origin"] == ORIGIN, record


@pytest.mark.parametrize("file_format", sorted(FORMATS))
def test_every_defect_is_left_out_and_reported_row_by_row(good_rows, tmp_path, file_format):
    fmt = FORMATS[file_format][0]
    defects = dict(enumerate(DEFECTS))
    rows = break_rows(good_rows[file_format], defects, fmt, tmp_path / "broken")
    check, skipped = run_checks(tmp_path, rows, SKIP_ALL)
    assert_accounted_for(check, skipped, defects)
    assert check.kept == list(range(len(DEFECTS), ROWS))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    file_format=st.sampled_from(sorted(FORMATS)),
    defects=st.dictionaries(st.integers(0, ROWS - 1), st.sampled_from(sorted(DEFECTS)), max_size=8),
)
def test_any_mix_of_defects_in_either_format_is_accounted_for(good_rows, tmp_path_factory, file_format, defects):
    folder = tmp_path_factory.mktemp("mix")
    rows = break_rows(good_rows[file_format], defects, FORMATS[file_format][0], folder / "broken")
    check, skipped = run_checks(folder, rows, SKIP_ALL)
    assert_accounted_for(check, skipped, defects)


@pytest.mark.parametrize(
    "defect, named",
    [
        ("identical", "[error] identical-pair (row 5, field 'rejected')"),
        ("image-huge", "[error] image-unreadable (row 5, field 'images[0]'): the image file"),
        ("image-zero-byte", "is empty (0 bytes)"),
        ("image-extra", "[error] image-count-mismatch (row 5, field 'images')"),
        ("wrong-prompt-role", "[error] malformed-row (row 5, field 'messages[0]'): the prompt ends with a 'customer'"),
    ],
)
def test_with_the_built_in_policies_the_checks_stop_naming_row_field_and_fix(good_rows, tmp_path, defect, named):
    rows = break_rows(good_rows["swift"], {5: defect}, SWIFT, tmp_path / "broken")
    with pytest.raises(PairCheckError) as error:
        run_checks(tmp_path, rows, CollationConfig())
    message = str(error.value)
    assert message.startswith(
        f"checks of {tmp_path / 'train.jsonl'} failed for 1 row(s) before the framework loaded it: 5"
    ), message
    assert named in message and "Fix:" in message, message


def test_a_huge_image_is_named_by_pillow_s_own_reason(good_rows, tmp_path):
    rows = break_rows(good_rows["llamafactory"], {0: "image-huge"}, LLAMAFACTORY, tmp_path / "broken")
    with pytest.raises(PairCheckError, match=r"DecompressionBombError: Image size \(900000000 pixels\)"):
        run_checks(tmp_path, rows, CollationConfig())


def test_a_line_that_is_not_utf8_cannot_be_skipped(good_rows, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", good_rows["swift"])
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b"user", b"us\xe9r", 1)
    path.write_bytes(b"".join(lines))
    with pytest.raises(PairCheckError) as error:
        check_file(path, SKIP_ALL, framework="ms-swift", report=ReportFile(), report_path=tmp_path / "r.jsonl")
    message = str(error.value)
    assert "[error] malformed-row (row 3): the line is not UTF-8" in message, message
    assert "ms-swift reads the file as a whole and fails on such a line, so the row cannot be left out" in message


def test_only_the_rows_the_framework_will_read_are_checked(good_rows, tmp_path):
    rows = break_rows(good_rows["swift"], {9: "identical"}, SWIFT, tmp_path / "broken")
    check, skipped = run_checks(tmp_path, rows, CollationConfig(), row_limit=9)  # max_samples: 9
    assert (check.rows, check.skipped, skipped) == (9, {}, [])


def test_the_report_goes_on_after_the_file_checks_lines(good_rows, tmp_path):
    rows = break_rows(good_rows["swift"], {2: "identical"}, SWIFT, tmp_path / "broken")
    report = ReportFile()
    path = tmp_path / "collation_report.jsonl"
    check_file(write_jsonl(tmp_path / "t.jsonl", rows), SKIP_ALL, framework="f", report=report, report_path=path)
    later = ReportFile()
    later.started |= report.started  # what the adapters hand the trainer's collation plugin
    finding = json.loads(path.read_text().splitlines()[0])
    assert finding["row"] == 2
    later.write([(Finding("empty-response", Severity.WARNING, "m", "f", row=7, field="chosen"), "skip")], path, "scan")
    assert [json.loads(line)["row"] for line in path.read_text().splitlines()] == [2, 7]


def test_the_row_account_names_what_the_framework_dropped(caplog):
    account = RowAccount(
        "train.jsonl", "ms-swift", rows_in=20, skipped_by_file_checks=3, loaded=15, skipped_by_prescan=1
    )
    assert (account.dropped_by_framework, account.training) == (2, 14)
    with caplog.at_level(logging.INFO, logger="vlm"):
        account.log(logging.getLogger("vlm"))
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        "vlm-dpo: rows of train.jsonl: 20 in; 14 training, 3 left out by the file checks, 1 left out by the "
        "collation pre-scan, 2 dropped by ms-swift (ms-swift's own log above names them"
    )


def test_the_pre_scan_keeps_positions_by_the_row_each_carries():
    summary = CollationSummary(skipped_rows={12, 15})
    assert keep_rows(4, summary, row_indices=[12, 13, 14, 15]) == [1, 2]
    assert keep_rows(4, summary) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "name, unread_because, notice",
    [
        ("data.jsonl", None, None),
        ("data.jsonl", "'#N' draws its rows out of file order", "'#N' draws its rows out of file order"),
        ("data.parquet", None, "it is not one local .json/.jsonl file"),
        ("missing.json", None, "it is not one local .json/.jsonl file"),
    ],
)
def test_a_file_the_checks_cannot_read_as_the_framework_does_is_named_and_left_to_the_live_checks(
    tmp_path, caplog, name, unread_because, notice
):
    from vlm_dpo_plugins.collation.file_checks import FileChecks

    for existing in ("data.jsonl", "data.parquet"):
        (tmp_path / existing).write_text("{}\n")
    with caplog.at_level(logging.INFO, logger="vlm_dpo_plugins"):
        path = FileChecks.checkable("my_dataset", tmp_path / name, unread_because)
    if notice is None:
        assert path == tmp_path / name and not caplog.records
    else:
        assert path is None
        assert [record.getMessage() for record in caplog.records] == [
            f"vlm-dpo: my_dataset is checked per batch during training, not as a file before loading: {notice}"
        ]
