"""scripts/reliability_table.py: the fault table of docs/reliability.md, written and checked from suite results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from bad_input import BAD_INPUT
from fault_matrix import CONSECUTIVE, DISTRIBUTED_ROWS, KILL_ROWS
from fault_plugin import FAULTS

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "reliability.md"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("reliability_table", ROOT / "scripts" / "reliability_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_results(path: Path, table, outcome=lambda framework, row: "passed") -> Path:
    cells = [
        {"framework": framework, "row": row, "outcome": outcome(framework, row), "test": "t"}
        for framework in table.FRAMEWORKS
        for row in table.ROWS
        if (framework, row) not in table.NOT_RUN_HERE
    ]
    path.write_text("".join(json.dumps(cell) + "\n" for cell in cells))
    return path


def test_the_table_has_a_row_for_every_injected_fault_and_the_halt(table):
    assert list(table.ROWS) == [*FAULTS, CONSECUTIVE, *KILL_ROWS.values(), *DISTRIBUTED_ROWS, BAD_INPUT]


def test_the_committed_page_shows_every_cell_passing(table, tmp_path):
    results = write_results(tmp_path / "results.jsonl", table)
    assert table.main([str(results), "--check", str(PAGE)]) == 0


def test_a_failed_or_missing_cell_fails_the_check_and_is_shown(table, tmp_path, capsys):
    page = tmp_path / "reliability.md"
    page.write_text(PAGE.read_text())
    failed = write_results(tmp_path / "failed.jsonl", table, lambda f, row: "failed" if row == "spike" else "passed")
    assert table.main([str(failed), "--write", str(page)]) == 1
    assert "| **FAIL** |" in page.read_text() and "ms-swift × spike: **FAIL**" in capsys.readouterr().err
    lines = failed.read_text().splitlines()
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join(line for line in lines if '"TRL"' not in line))
    assert table.main([str(partial), "--check", str(PAGE)]) == 1
    assert "TRL × loss-nan: not run" in capsys.readouterr().err


def test_a_page_that_does_not_show_the_results_fails_the_check(table, tmp_path, capsys):
    page = tmp_path / "reliability.md"
    page.write_text(PAGE.read_text().replace("| pass |", "| ? |", 1))
    results = write_results(tmp_path / "results.jsonl", table)
    assert table.main([str(results), "--check", str(page)]) == 1
    assert "does not show these results" in capsys.readouterr().err
    assert table.main([str(results), "--write", str(page)]) == 0
    assert page.read_text() == PAGE.read_text()


def test_an_unknown_cell_is_named(table, tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"framework": "TRL", "row": "gpu-on-fire", "outcome": "passed"}) + "\n")
    with pytest.raises(SystemExit, match=r"results.jsonl:1: unknown cell \('TRL', 'gpu-on-fire'\)"):
        table.main([str(results), "--check", str(PAGE)])


def test_a_cell_that_cannot_run_here_shows_its_reason_and_is_not_counted_missing(table, tmp_path, capsys):
    assert table.NOT_RUN_HERE, "no such cell left: drop this test"
    (framework, row), reason = next(iter(table.NOT_RUN_HERE.items()))
    page = tmp_path / "reliability.md"
    page.write_text(PAGE.read_text())
    results = write_results(tmp_path / "results.jsonl", table)
    assert table.main([str(results), "--write", str(page)]) == 0
    (line,) = [line for line in page.read_text().splitlines() if f"(`{row}`)" in line]
    assert f"| n/a: {reason} |" in line
    assert f"{framework} × {row}" not in capsys.readouterr().err
