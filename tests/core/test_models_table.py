"""scripts/models_table.py: the family table of docs/models.md, written and checked from the sessions' cells."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "models.md"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("models_table", ROOT / "scripts" / "models_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results(path: Path, *cells: tuple[str, str, str, str]) -> Path:
    lines = [
        json.dumps({"framework": framework, "feature": feature, "family": family, "outcome": outcome, "test": "t"})
        for framework, feature, family, outcome in cells
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_cell_is_its_worst_outcome_and_an_untested_one_a_dash(table, tmp_path):
    page = tmp_path / "models.md"
    page.write_text(f"intro\n{table.BEGIN}\n{table.END}\nafter\n")
    first = results(tmp_path / "a.jsonl", ("TRL", "sharing", "gemma3", "passed"), ("TRL", "stock", "llava", "passed"))
    second = results(tmp_path / "b.jsonl", ("TRL", "sharing", "gemma3", "failed"))
    assert table.main([str(first), str(second), str(tmp_path / "missing.jsonl"), "--write", str(page)]) == 1
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n")
    sharing = next(line for line in text.splitlines() if line.startswith("| Gemma 3 | one packed row"))
    assert sharing.endswith("| **FAIL** | — | — |")
    assert table.main([str(first), "--write", str(page)]) == 0
    assert table.main([str(first), "--check", str(page)]) == 0
    assert table.main([str(second), "--check", str(page)]) == 1  # the page shows other results


def test_an_unknown_cell_names_the_line_and_what_is_known(table, tmp_path):
    path = results(tmp_path / "a.jsonl", ("TRL", "sharing", "idefics9", "passed"))
    with pytest.raises(SystemExit, match=r"a.jsonl:1: unknown cell \('idefics9', 'sharing', 'TRL'\)"):
        table.read_cells([path])


def test_the_page_has_the_markers(table):
    text = PAGE.read_text()
    assert table.BEGIN in text and table.END in text
