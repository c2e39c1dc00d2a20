"""The GPU table's script (``benchmarks/gpu_table.py``) end to end on CPU, one released-size preset at a time with
one layer per stack: every arm runs, the table lands between the page's markers, and what cannot run here
(FlashAttention-2, flash-pref) is a row with its reason. Numbers are checked for what they must say (one image
encode per pair with sharing, the loss equal to stock's), never for speed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="needs the TRL test environment")

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "gpu_table.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_table  # noqa: E402

BEGIN, END = gpu_table.BEGIN, gpu_table.END


@pytest.mark.parametrize("preset", ["qwen2-vl-2b", "llava-1.5-7b"])
def test_the_gpu_script_runs_on_cpu_and_writes_its_table(tmp_path, preset):
    page = tmp_path / "performance.md"
    page.write_text(f"before\n{BEGIN}\nnot measured on a GPU\n{END}\nafter\n")
    command = [
        sys.executable, str(SCRIPT), "--device", "cpu", "--preset-layers", "1", "--fp32", "--presets", preset,
        "--steps", "1", "--warmup", "0", "--batch-size", "1", "--response-words", "4", "--write", str(page),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    text = page.read_text()
    assert text.startswith(f"before\n{BEGIN}\nMeasured on CPU") and text.endswith(f"{END}\nafter\n"), text
    assert "not measured on a GPU" not in text
    rows = {tuple(cell.strip() for cell in line.split("|")[2:4]): line.split("|") for line in text.splitlines()[4:-2]}
    arms = ["stock", "plugins, no sharing", "plugins, dense mask", "plugins", "plugins + precompute"]
    for arm in arms:
        cells = [cell.strip() for cell in rows[("sdpa", arm)]]
        images, loss_diff = float(cells[11]), float(cells[12])
        assert images == (4 if arm in ("stock", "plugins, no sharing") else 1), cells
        assert loss_diff <= 1e-5, cells
    assert "not run: flash-pref is not installed" in "".join(rows[("sdpa", "flash-pref")])
    assert "not run: FlashAttention-2 needs a CUDA device" in "".join(rows[("flash_attention_2", "every arm")])


def test_a_page_without_the_markers_is_refused_by_name(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="has no '<!-- gpu table"):
        gpu_table.write_table(page, ["| a |"])
    assert page.read_text() == "no markers here\n"
