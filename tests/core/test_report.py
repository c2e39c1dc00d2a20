"""``vlm-dpo report``: every framework's log read into the same records, and the page checked in headless Chromium."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest

from vlm_dpo_plugins.cli import main
from vlm_dpo_plugins.diagnostics.replay import replay_detectors
from vlm_dpo_plugins.runlog.metrics import MetricsLog
from vlm_dpo_plugins.runlog.report import PANELS, write_report
from vlm_dpo_plugins.runlog.sources import RunLogError, read_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRE_BROWSER = os.environ.get("VLM_DPO_REQUIRE_CHROMIUM") == "1"
LN2 = math.log(2)


def trainer_state(path: Path, history: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"global_step": len(history), "log_history": history}))


def dpo_entry(step: int, loss: float, **extra) -> dict:
    return {
        "step": step,
        "loss": loss,
        "rewards/margins": 0.1 * step,
        "rewards/accuracies": 0.5 + 0.05 * step,
        "rewards/chosen": 0.05 * step,
        "rewards/rejected": -0.05 * step,
        "grad_norm": 1.0 + step,
        "learning_rate": 1e-5,
        **extra,
    }


# -- readers ----------------------------------------------------------------------------------


def test_trainer_state_in_the_newest_checkpoint(tmp_path):
    trainer_state(tmp_path / "checkpoint-2" / "trainer_state.json", [dpo_entry(1, 0.69), dpo_entry(2, 0.6)])
    trainer_state(
        tmp_path / "checkpoint-10" / "trainer_state.json",
        [dpo_entry(1, 0.69), {"step": 1, "eval_loss": 0.7}, dpo_entry(2, 0.6), dpo_entry(3, 0.5)],
    )
    run = read_run(tmp_path)
    assert run.framework == "trl" and run.source == tmp_path / "checkpoint-10" / "trainer_state.json"
    assert [r["step"] for r in run.records] == [1, 2, 3]  # the eval entry has no training loss
    assert run.records[2] == {"step": 3, **{k: float(v) for k, v in dpo_entry(3, 0.5).items() if k != "step"}}


def test_llamafactory_prefers_its_trainer_state_but_takes_findings_from_its_log(tmp_path):
    lines = [
        {"current_steps": 1, "total_steps": 3, "loss": 0.69, "lr": 1e-5, "reward": 0.0, "accuracy": 0.0},
        {
            "current_steps": 2,
            "total_steps": 3,
            "loss": 0.6,
            "lr": 1e-5,
            "vlm_dpo_findings": ["[warning] non-finite (step 2): non-finite values at step 2 Fix: clip"],
        },
    ]
    (tmp_path / "trainer_log.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    run = read_run(tmp_path)
    assert run.framework == "llamafactory" and run.records == [
        {
            "step": 1,
            "loss": 0.69,
            "learning_rate": 1e-5,
            "rewards/chosen": 0.0,
            "rewards/accuracies": 0.0,
            "total_steps": 3.0,
        },
        {"step": 2, "loss": 0.6, "learning_rate": 1e-5, "total_steps": 3.0},
    ]
    assert run.findings == [
        {
            "step": 2,
            "code": "non-finite",
            "severity": "warning",
            "message": "non-finite values at step 2",
            "fix": "clip",
        }
    ]
    trainer_state(tmp_path / "trainer_state.json", [dpo_entry(1, 0.69)])
    run = read_run(tmp_path)
    assert run.source.name == "trainer_state.json" and "rewards/margins" in run.records[0]
    assert run.findings[0]["code"] == "non-finite"


def test_swift_logging_lines(tmp_path):
    lines = [
        {
            "loss": 0.69,
            "rewards/margins": 0.0,
            "grad_norm": "NaN",
            "global_step/max_steps": "1/4",
            "vlm_dpo_findings": [{"code": "loss-stuck-at-ln2", "severity": "warning", "message": "m", "fix": "f"}],
        },
        {"eval_loss": 0.7, "global_step/max_steps": "1/4"},
        {"loss": 0.6, "rewards/margins": 0.2, "global_step/max_steps": "2/4"},
    ]
    (tmp_path / "logging.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n{cut off")
    run = read_run(tmp_path)
    assert run.framework == "swift" and [r["step"] for r in run.records] == [1, 2]
    assert math.isnan(run.records[0]["grad_norm"])
    assert run.findings == [{"step": 1, "code": "loss-stuck-at-ln2", "severity": "warning", "message": "m", "fix": "f"}]
    assert run.notes == ["logging.jsonl line 4 is not JSON; left out"]


def test_the_findings_file_wins_and_an_empty_folder_names_what_was_looked_for(tmp_path):
    with pytest.raises(RunLogError, match=r"looked for metrics\.jsonl, logging\.jsonl \(ms-swift\), trainer_log"):
        read_run(tmp_path)
    MetricsLog(tmp_path / "metrics.jsonl").append(1, {"loss": math.inf})
    (tmp_path / "vlm_dpo_findings.jsonl").write_text(json.dumps({"step": 1, "code": "non-finite"}) + "\n")
    run = read_run(tmp_path)
    assert run.framework == "vlm-dpo" and math.isinf(run.records[0]["loss"])
    assert run.findings == [{"step": 1, "code": "non-finite"}]


# -- the page -----------------------------------------------------------------------------------


@pytest.fixture
def stalled_stock_run(tmp_path):
    """A stock run (no findings of its own) stuck at ln 2, with a skipped step, an unfreeze and a hostile message."""
    history = [
        dpo_entry(
            step,
            LN2,
            **{
                "rewards/margins": 0.0,
                "vlm_dpo/skipped_steps": float(step >= 6),
                "vlm_dpo/unfreeze_stage": float(step >= 8),
                "vlm_dpo/grad_norm": 2.0 + step,
                "vlm_dpo/grad_norm_clipped": 1.0,
            },
        )
        for step in range(1, 13)
    ]
    history[3]["grad_norm"] = math.nan
    trainer_state(tmp_path / "run" / "trainer_state.json", history)
    (tmp_path / "run" / "vlm_dpo_findings.jsonl").write_text(
        json.dumps(
            {"step": 4, "code": "non-finite", "severity": "warning", "message": "<script>alert(1)</script>", "fix": "x"}
        )
        + "\n"
    )
    return tmp_path / "run"


def test_the_page_holds_every_plot_the_findings_and_the_replayed_stall(stalled_stock_run):
    result = write_report(stalled_stock_run, extra_findings=replay_detectors)
    page = result.html_path.read_text()
    assert set(result.png_paths) == {panel.name for panel in PANELS}
    assert page.count("<img class='plot'") == len(PANELS) and "data:image/png;base64," in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    codes = [finding["code"] for finding in result.findings]
    assert codes == ["non-finite", "loss-stuck-at-ln2"]  # the logged one, then the replay's own cause
    assert "replayed from the log" in page
    assert "<tr><th>skipped steps</th><td>1</td></tr>" in page and "<th>unfreeze events</th><td>8</td>" in page


def test_a_metric_the_run_did_not_log_is_drawn_saying_so(tmp_path):
    MetricsLog(tmp_path / "metrics.jsonl").append(1, {"loss": 0.69})
    MetricsLog(tmp_path / "metrics.jsonl").append(2, {"loss": 0.6})
    result = write_report(tmp_path)
    assert "rewards/margins" in result.missing and "vlm_dpo/grad_norm or grad_norm" in result.missing
    assert "metrics not logged by this run: rewards/margins" in result.html_path.read_text()


def test_the_command_writes_the_page(stalled_stock_run, tmp_path, capsys):
    assert main(["report", str(stalled_stock_run), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'out' / 'report.html'}" in out and "2 finding(s)" in out
    assert main(["report", str(tmp_path / "nothing-here")]) == 2


# -- in a real browser -------------------------------------------------------------------------------


def browser():
    if CHROMIUM is None:
        if REQUIRE_BROWSER:
            pytest.fail("VLM_DPO_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("chromium is not installed (Debian package chromium); CI installs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if REQUIRE_BROWSER:
            pytest.fail("VLM_DPO_REQUIRE_CHROMIUM=1 but the playwright package is missing")
        pytest.skip("the playwright package is not installed")
    return sync_playwright


BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def plot_screenshots(page_path: Path) -> dict[str, dict]:
    with browser()() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = chromium.new_page(viewport={"width": 1200, "height": 900})
            page.goto(page_path.resolve().as_uri())
            shots = {}
            for image in page.locator("img.plot").all():
                shots[image.get_attribute("data-metric")] = {
                    "loaded": image.evaluate("img => img.complete && img.naturalWidth > 0"),
                    "box": image.bounding_box(),
                    "png": image.screenshot(),
                }
            return shots
        finally:
            chromium.close()


def ink(png: bytes) -> tuple[float, int]:
    """The fraction of pixels that are not near-white, and the number of distinct colours."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=image.width * image.height)
    inked = sum(count for count, (r, g, b) in colours if min(r, g, b) < 235)
    return inked / (image.width * image.height), len(colours)


def test_every_plot_renders_visibly_in_headless_chromium(stalled_stock_run):
    result = write_report(stalled_stock_run, extra_findings=replay_detectors)
    shots = plot_screenshots(result.html_path)
    assert set(shots) == {panel.name for panel in PANELS}
    for name, shot in shots.items():
        assert shot["loaded"], f"{name}: the image did not load"
        assert shot["box"]["width"] >= 700 and shot["box"]["height"] >= 250, (name, shot["box"])
        inked, colours = ink(shot["png"])
        assert inked > 0.03 and colours > 20, f"{name}: plot area looks blank ({inked:.3f} inked, {colours} colours)"


def test_the_blank_check_fails_on_a_blank_image(tmp_path):
    from PIL import Image

    Image.new("RGB", (800, 320), "white").save(tmp_path / "blank.png")
    (tmp_path / "blank.html").write_text(f"<img class='plot' data-metric='blank' src='{tmp_path / 'blank.png'}'>")
    [shot] = plot_screenshots(tmp_path / "blank.html").values()
    assert shot["loaded"]
    inked, colours = ink(shot["png"])
    assert inked < 0.03 and colours <= 20
