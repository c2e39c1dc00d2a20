"""``vlm-dpo report``: every framework's log read into the same records, and the page checked in headless Chromium."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest

from vlm_dpo_plugins.diagnostics.replay import replay_detectors
from vlm_dpo_plugins.errors import VLMDPOError
from vlm_dpo_plugins.runlog.metrics import MetricsLog
from vlm_dpo_plugins.runlog.report import PANELS, merge_findings, write_report
from vlm_dpo_plugins.runlog.report_command import run_report
from vlm_dpo_plugins.runlog.sources import RunLogError, as_finding, read_run
from vlm_dpo_plugins.types import Finding, Severity

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRE_BROWSER = os.environ.get("VLM_DPO_REQUIRE_CHROMIUM") == "1"
LN2 = math.log(2)
NAN = math.nan


def write_state(path: Path, history: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"global_step": history[-1].get("step", 0), "log_history": history}))  # NaN as JSON NaN


def write_lines(path: Path, lines: list, tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines) + tail)


def dpo_entry(step: int, loss: float, **extra) -> dict:
    """A log_history entry as TRL's DPOTrainer writes it."""
    return {
        "loss": loss,
        "grad_norm": 1.0 + step,
        "learning_rate": 1e-5,
        "rewards/chosen": 0.05 * step,
        "rewards/rejected": -0.05 * step,
        "rewards/accuracies": 0.5 + 0.125 * step,
        "rewards/margins": 0.1 * step,
        "logps/chosen": -10.0,
        "epoch": 0.25 * step,
        "step": step,
        **extra,
    }


def same(actual, expected) -> bool:
    """Equality where NaN equals NaN (records carry non-finite floats on purpose)."""
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(actual, float) and math.isnan(actual)
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and actual.keys() == expected.keys()
            and all(same(actual[k], v) for k, v in expected.items())
        )
    if isinstance(expected, list):
        return isinstance(actual, list) and len(actual) == len(expected) and all(map(same, actual, expected))
    return actual == expected and type(actual) is type(expected)


# -- readers ------------------------------------------------------------------------------------------------------


def test_trl_trainer_state_from_the_newest_checkpoint(tmp_path):
    write_state(tmp_path / "checkpoint-2" / "trainer_state.json", [dpo_entry(1, 0.69), dpo_entry(2, 0.6)])
    write_state(
        tmp_path / "checkpoint-10" / "trainer_state.json",  # newest by number although "checkpoint-10" < "checkpoint-2"
        [
            dpo_entry(1, LN2, **{"vlm_dpo/grad_norm": 4.0, "vlm_dpo/grad_norm/vision": 3.0}),
            {"eval_loss": 0.7, "eval_rewards/margins": 0.0, "epoch": 0.25, "step": 1},
            dpo_entry(2, 0.6, grad_norm=NAN, **{"vlm_dpo/skipped_steps": 1, "vlm_dpo_findings": ["[error] x: y"]}),
            {"train_runtime": 3.2, "train_loss": 0.65, "epoch": 0.5, "step": 2},
        ],
    )
    run = read_run(tmp_path)
    assert run.framework == "trl" and run.source == str(tmp_path / "checkpoint-10" / "trainer_state.json")
    common = {"learning_rate": 1e-5, "logps/chosen": -10.0}
    expected = [
        {
            "step": 1,
            **{"loss": LN2, "grad_norm": 2.0, **common, "rewards/chosen": 0.05, "rewards/rejected": -0.05},
            **{"rewards/accuracies": 0.625, "rewards/margins": 0.1, "epoch": 0.25},
            **{"vlm_dpo/grad_norm": 4.0, "vlm_dpo/grad_norm/vision": 3.0},
        },
        {
            "step": 2,
            **{"loss": 0.6, "grad_norm": NAN, **common, "rewards/chosen": 0.1, "rewards/rejected": -0.1},
            **{"rewards/accuracies": 0.75, "rewards/margins": 0.2, "epoch": 0.5, "vlm_dpo/skipped_steps": 1.0},
        },
    ]
    assert same(run.records, expected), run.records  # the eval entry and the summary have no training loss
    assert run.findings == [{"step": 2, "code": "x", "severity": "error", "message": "y", "fix": ""}]
    assert run.notes == []


def test_llamafactory_takes_a_checkpoints_trainer_state_and_the_log_steps_after_it(tmp_path):
    log = [
        {"current_steps": 1, "total_steps": 4, "loss": 0.69, "lr": 1e-5, "epoch": 0.25, "percentage": 25.0},
        {"current_steps": 1, "total_steps": 4, "eval_loss": 0.7, "epoch": 0.25, "percentage": 25.0},
        {
            **{"current_steps": 2, "total_steps": 4, "loss": 0.6, "lr": 1e-5, "accuracy": 0.5, "epoch": 0.5},
            **{"elapsed_time": "0:00:02", "vlm_dpo_findings": ["[warning] non-finite (step 2): seen Fix: clip"]},
        },
        {"current_steps": 3, "total_steps": 4, "loss": 0.5, "lr": 1e-5, "reward": 0.3, "epoch": 0.75},
        {"current_steps": 4, "total_steps": 4, "loss": 0.4, "lr": 5e-6, "accuracy": 1.0, "epoch": 1.0},
    ]
    write_lines(tmp_path / "trainer_log.jsonl", log)
    run = read_run(tmp_path)  # no trainer_state.json yet: the log alone, its keys renamed
    assert run.framework == "llamafactory" and run.source == str(tmp_path / "trainer_log.jsonl")
    assert run.records == [
        {"step": 1, "loss": 0.69, "learning_rate": 1e-5, "epoch": 0.25},
        {"step": 2, "loss": 0.6, "learning_rate": 1e-5, "rewards/accuracies": 0.5, "epoch": 0.5},
        {"step": 3, "loss": 0.5, "learning_rate": 1e-5, "reward": 0.3, "epoch": 0.75},  # PPO's reward, not chosen
        {"step": 4, "loss": 0.4, "learning_rate": 5e-6, "rewards/accuracies": 1.0, "epoch": 1.0},
    ]
    finding = {"step": 2, "code": "non-finite", "severity": "warning", "message": "seen", "fix": "clip"}
    assert run.findings == [finding]
    assert run.notes == [
        "not logged by this run: rewards/margins, rewards/chosen, rewards/rejected, grad_norm or vlm_dpo/grad_norm"
    ]

    write_state(tmp_path / "checkpoint-3" / "trainer_state.json", [dpo_entry(step, 0.5 / step) for step in (1, 2, 3)])
    run = read_run(tmp_path)
    assert run.framework == "llamafactory" and run.source == str(tmp_path / "checkpoint-3" / "trainer_state.json")
    assert [record["step"] for record in run.records] == [1, 2, 3, 4]
    assert same(run.records[2], {"step": 3, **{k: float(v) for k, v in dpo_entry(3, 0.5 / 3).items() if k != "step"}})
    assert run.records[3] == {"step": 4, "loss": 0.4, "learning_rate": 5e-6, "rewards/accuracies": 1.0, "epoch": 1.0}
    assert run.findings == [finding]
    assert run.notes == [
        f"steps 4-4 are from trainer_log.jsonl (after {tmp_path / 'checkpoint-3' / 'trainer_state.json'} was saved): "
        "only its keys are there"
    ]


def test_swift_logging_lines(tmp_path):
    finding = {"code": "loss-stuck-at-ln2", "severity": "warning", "message": "m", "fix": "f"}
    lines = [
        {
            **{"loss": 0.69, "grad_norm": "NaN", "learning_rate": 1e-5, "memory(GiB)": 1.5, "train_speed(iter/s)": 2.0},
            **{"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracies": 0.0, "rewards/margins": 0.0},
            **{"global_step/max_steps": "1/4", "elapsed_time": "1s", "remaining_time": "3s"},
            "vlm_dpo_findings": [finding, finding],  # the same finding twice is listed once
        },
        {"eval_loss": 0.7, "global_step/max_steps": "1/4", "vlm_dpo_findings": ["[info] eval-note (step 1): e"]},
        {"loss": 0.6, "grad_norm": "Infinity", "rewards/margins": 0.2, "global_step/max_steps": "2/4"},
        {"train_runtime": 5.0, "train_loss": 0.65, "global_step/max_steps": "2/4"},
    ]
    write_lines(tmp_path / "logging.jsonl", lines, tail='{"loss": 0.5, "global_st')  # killed mid-write
    run = read_run(tmp_path)
    assert run.framework == "swift" and run.source == str(tmp_path / "logging.jsonl")
    expected = [
        {
            **{"step": 1, "loss": 0.69, "grad_norm": NAN, "learning_rate": 1e-5, "memory(GiB)": 1.5},
            **{"train_speed(iter/s)": 2.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0},
            **{"rewards/accuracies": 0.0, "rewards/margins": 0.0},
        },
        {"step": 2, "loss": 0.6, "grad_norm": math.inf, "rewards/margins": 0.2},
    ]
    assert same(run.records, expected), run.records
    assert run.findings == [
        {"step": 1, **finding},
        {"step": 1, "code": "eval-note", "severity": "info", "message": "e", "fix": ""},  # kept from an eval line
    ]
    assert run.notes == ["logging.jsonl line 5 is not a JSON object; left out"]


def test_metrics_jsonl_with_non_finite_spellings_and_the_findings_file(tmp_path):
    write_lines(
        tmp_path / "metrics.jsonl",
        [
            {
                "step": 2,
                "loss": "NaN",
                "grad_norm": "Infinity",
                "vlm_dpo/grad_norm": "-Infinity",
                "events": ["skipped"],
            },
            {"step": 1, "loss": 0.69, "vlm_dpo/skipped_steps": 0, "vlm_dpo/unfreeze_stage": 0, "events": []},
        ],
    )
    (tmp_path / "vlm_dpo_findings.jsonl").write_text(json.dumps({"step": 2, "code": "non-finite"}) + "\n")
    run = read_run(tmp_path)
    assert run.framework == "vlm-dpo" and run.source == str(tmp_path / "metrics.jsonl")
    expected = [
        {"step": 1, "loss": 0.69, "vlm_dpo/skipped_steps": 0.0, "vlm_dpo/unfreeze_stage": 0.0, "events": []},
        {"step": 2, "loss": NAN, "grad_norm": math.inf, "vlm_dpo/grad_norm": -math.inf, "events": ["skipped"]},
    ]
    assert same(run.records, expected), run.records
    # The findings file wins over anything in the log lines, and each finding gets every field the page shows.
    assert run.findings == [{"step": 2, "code": "non-finite", "severity": "warning", "message": "", "fix": ""}]

    MetricsLog(tmp_path / "metrics.jsonl").append(3, {"loss": math.inf})  # the writer's own spelling reads back too
    assert read_run(tmp_path).records[-1] == {"step": 3, "loss": math.inf, "events": []}


def test_what_cannot_be_read_names_the_folder_and_the_files(tmp_path):
    for folder in (tmp_path, tmp_path / "missing"):
        with pytest.raises(RunLogError) as error:
            read_run(folder)
        assert str(folder) in str(error.value)
        for name in ("metrics.jsonl", "logging.jsonl", "trainer_log.jsonl", "trainer_state.json", "checkpoint-N"):
            assert name in str(error.value)
    assert issubclass(RunLogError, VLMDPOError)  # the CLI prints it as one line and exits 2
    (tmp_path / "trainer_state.json").write_text('{"log_history": [')
    with pytest.raises(RunLogError, match=r"trainer_state\.json is not valid JSON"):
        read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("not json\n{}\n")
    with pytest.raises(RunLogError, match=r"metrics\.jsonl: line 1 is not valid JSON"):
        read_run(tmp_path)


def test_findings_from_detectors_and_logs_are_merged_once():
    detector = Finding("loss-stuck-at-ln2", Severity.WARNING, "flat", fix="raise lr", step=5)
    assert as_finding(detector) == {
        **{"code": "loss-stuck-at-ln2", "severity": "warning", "message": "flat", "fix": "raise lr", "step": 5},
        **{"row": None, "field": None, "source": ""},
    }
    as_dict = as_finding({"code": "margin-oscillation", "severity": "INFO", "message": "m"}, step=3)
    assert as_dict == {"code": "margin-oscillation", "severity": "info", "message": "m", "fix": "", "step": 3}
    logged = [as_finding({"code": "loss-stuck-at-ln2", "message": "live", "step": 4})]
    merged = merge_findings(logged, [as_finding(detector), as_dict, as_dict])
    assert [(f["code"], f["step"], f["origin"]) for f in merged] == [
        ("margin-oscillation", 3, "replayed from the log"),
        ("loss-stuck-at-ln2", 4, "logged by the run"),  # the replay's own one of this code is dropped
    ]


# -- the page -----------------------------------------------------------------------------------------------------


@pytest.fixture
def stalled_stock_run(tmp_path):
    """A run stuck at ln 2, with a skipped step, an unfreeze, a NaN grad norm and a hostile logged message."""
    history = [
        dpo_entry(
            step,
            LN2,
            **{
                "rewards/margins": 0.0,
                "vlm_dpo/skipped_steps": float(step >= 6),
                "vlm_dpo/unfreeze_stage": float(step >= 8),
                "vlm_dpo/grad_norm": 2.0 + step**3,
                "vlm_dpo/grad_norm_clipped": 1.0,
            },
        )
        for step in range(1, 13)
    ]
    history[3]["vlm_dpo/grad_norm"] = NAN
    write_state(tmp_path / "run" / "trainer_state.json", history)
    hostile = {"step": 4, "code": "non-finite", "severity": "warning", "message": "<script>alert(1)</script>"}
    (tmp_path / "run" / "vlm_dpo_findings.jsonl").write_text(json.dumps({**hostile, "fix": "a & b"}) + "\n")
    return tmp_path / "run"


def test_the_page_holds_every_plot_the_findings_and_the_replayed_stall(stalled_stock_run):
    result = write_report(stalled_stock_run, extra_findings=replay_detectors)
    page = result.html_path.read_text()
    assert result.html_path == stalled_stock_run / "vlm-dpo-report" / "report.html"
    assert set(result.png_paths) == {panel.name for panel in PANELS}
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in result.png_paths.values())
    for panel in PANELS:
        assert f'<img class="plot" data-metric="{panel.name}" alt="{panel.title} over training steps"' in page
    assert page.count('src="data:image/png;base64,') == len(PANELS)
    assert "<script" not in page and "http" not in page  # self-contained, nothing to run or fetch
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a &amp; b" in page
    assert [finding["code"] for finding in result.findings] == ["non-finite", "loss-stuck-at-ln2"]
    assert [finding["origin"] for finding in result.findings] == ["logged by the run", "replayed from the log"]
    assert f"<title>vlm-dpo report: {stalled_stock_run} (trainer_state.json)</title>" in page
    assert "<tr><th>skipped steps</th><td>1</td></tr>" in page
    assert "<tr><th>unfreeze events</th><td>step 8 (stage 1)</td></tr>" in page
    assert "<tr><th>findings</th><td>2</td></tr>" in page and "<tr><th>final loss</th><td>0.6931</td></tr>" in page
    assert "non-finite vlm_dpo/grad_norm at step(s) 4 (an x on the top border of its plot)" in page
    assert result.missing == [] and "not logged by this run" not in page


def test_a_metric_the_run_did_not_log_is_drawn_saying_so(tmp_path):
    for step, loss in ((1, 0.69), (2, 0.6)):
        MetricsLog(tmp_path / "metrics.jsonl").append(step, {"loss": loss, "rewards/chosen": 0.1})
    result = write_report(tmp_path, tmp_path / "out")
    page = result.html_path.read_text()
    assert result.html_path == tmp_path / "out" / "report.html"
    missing = ["rewards/margins", "rewards/accuracies", "rewards/rejected", "vlm_dpo/grad_norm or grad_norm"]
    assert result.missing == missing
    assert f"<li>metrics not logged by this run: {', '.join(missing)}</li>" in page
    assert (
        'alt="reward margin (chosen - rejected) over training steps (not logged by this run: rewards/margins)"' in page
    )
    assert page.count("<li>") == 1  # the reader's own note on missing metrics is not repeated


def test_the_command_prints_where_the_page_is(stalled_stock_run, tmp_path, capsys):
    assert run_report(argparse.Namespace(run_dir=stalled_stock_run, output=tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'out' / 'report.html'}" in out and "2 finding(s)" in out


# -- in a real browser --------------------------------------------------------------------------------------------

BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def unavailable(reason: str):
    if REQUIRE_BROWSER:
        pytest.fail(f"VLM_DPO_REQUIRE_CHROMIUM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium():
    """One headless Debian Chromium for the module's browser tests (a launch costs about a second)."""
    if CHROMIUM is None:
        unavailable("chromium is not installed (apt-get install chromium; CI installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed (pip install 'playwright>=1.50,<2')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def plot_screenshots(browser, page_path: Path) -> tuple[dict[str, dict], list[str]]:
    """Per ``img.plot``: loaded, on-screen box, visible, screenshot; and every URL the page requested."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    try:
        page.goto(page_path.resolve().as_uri())
        shots = {}
        for image in page.locator("img.plot").all():
            shots[image.get_attribute("data-metric")] = {
                "loaded": image.evaluate("img => img.complete && img.naturalWidth > 0"),
                "visible": image.is_visible(),
                "box": image.bounding_box(),
                "png": image.screenshot(),
            }
        return shots, requested
    finally:
        page.close()


def ink(png: bytes) -> tuple[float, int]:
    """The fraction of pixels that are not near-white, and the number of distinct colours."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=image.width * image.height)
    inked = sum(count for count, (r, g, b) in colours if min(r, g, b) < 235)
    return inked / (image.width * image.height), len(colours)


def looks_drawn(png: bytes) -> bool:
    inked, colours = ink(png)
    return inked > 0.03 and colours > 20


def test_every_plot_renders_visibly_in_headless_chromium(chromium, tmp_path):
    run = tmp_path / "run"
    for step in range(1, 9):  # margins and the clipped norm absent: their panels say so, and must still show
        metrics = {"loss": LN2 - 0.01 * step, "rewards/accuracies": 0.5, "grad_norm": 10.0**step}
        metrics.update({"vlm_dpo/skipped_steps": float(step >= 3), "vlm_dpo/unfreeze_stage": float(step >= 5)})
        MetricsLog(run / "metrics.jsonl").append(step, {**metrics, "loss": NAN} if step == 6 else metrics)
    result = write_report(run, extra_findings=replay_detectors)
    shots, requested = plot_screenshots(chromium, result.html_path)
    assert set(shots) == {panel.name for panel in PANELS}
    assert [url for url in requested if not url.startswith(("file:", "data:"))] == []
    for name, shot in shots.items():
        assert shot["loaded"] and shot["visible"], f"{name}: the image did not load or is hidden"
        assert shot["box"]["width"] >= 700 and shot["box"]["height"] >= 250, (name, shot["box"])
        inked, colours = ink(shot["png"])
        assert looks_drawn(shot["png"]), f"{name}: plot area looks blank ({inked:.3f} inked, {colours} colours)"


def test_the_checks_fail_on_a_blank_or_broken_image(chromium, tmp_path):
    from PIL import Image

    Image.new("RGB", (800, 320), "white").save(tmp_path / "blank.png")
    (tmp_path / "page.html").write_text(
        "<img class='plot' data-metric='blank' src='blank.png'>"
        "<img class='plot' data-metric='broken' src='missing.png' width='800' height='320'>"
    )
    shots, _ = plot_screenshots(chromium, tmp_path / "page.html")
    assert shots["blank"]["loaded"] and not looks_drawn(shots["blank"]["png"])
    assert not shots["broken"]["loaded"]
