"""The run log: metrics survive a killed run and non-finite values, and the plot is a real PNG."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from vlm_dpo_plugins.runlog.metrics import MetricsLog, read_metrics
from vlm_dpo_plugins.runlog.plot import skip_steps

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_round_trip_keeps_non_finite_values_and_events_and_the_file_stays_standard_json(tmp_path):
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")  # the parent folder does not exist yet
    log.append(1, {"loss": 0.6931, "rewards/margins": 0.0}, events=[])
    log.append(2, {"loss": math.nan, "grad_norm": math.inf, "vlm_dpo/lr_scale": -math.inf}, events=["skipped: nan"])
    log.append(3, {"loss": 0.5, "step": 99, "events": "ignored"})

    for line in log.path.read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not standard JSON"))
    records = read_metrics(log.path)
    assert [record["step"] for record in records] == [1, 2, 3]
    assert records[0] == {"step": 1, "loss": 0.6931, "rewards/margins": 0.0, "events": []}
    assert math.isnan(records[1]["loss"])
    assert records[1]["grad_norm"] == math.inf and records[1]["vlm_dpo/lr_scale"] == -math.inf
    assert records[1]["events"] == ["skipped: nan"]
    assert records[2]["events"] == []


def test_numpy_like_scalars_are_written_as_floats(tmp_path):
    class Scalar:  # what a numpy float32 or a 0-d tensor offers
        def __float__(self):
            return 0.25

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append(1, {"loss": Scalar()})
    assert read_metrics(log.path)[0]["loss"] == 0.25


def test_a_truncated_last_line_from_a_killed_run_is_ignored(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append(1, {"loss": 0.69})
    log.append(2, {"loss": 0.68})
    with open(log.path, "a") as file:
        file.write('{"step": 3, "loss": 0.6')  # killed mid-write: no closing brace, no newline

    assert [record["step"] for record in read_metrics(log.path)] == [1, 2]


def test_a_corrupt_line_in_the_middle_names_its_line_number(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.append(1, {"loss": 0.69})
    with open(path, "a") as file:
        file.write('{"step": 2, "loss": \n')  # complete line (newline written) yet broken: not a kill
    log.append(3, {"loss": 0.67})

    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        read_metrics(path)


def test_a_line_without_a_step_is_rejected(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"line 2 is not a metrics record"):
        read_metrics(path)


def test_skip_steps_come_from_events_and_from_the_skip_counter():
    records = [
        {"step": 1, "loss": 0.69, "events": []},
        {"step": 2, "loss": math.nan, "events": ["skipped: non-finite loss"]},  # event only
        {"step": 3, "vlm_dpo/skipped_steps": 0.0, "events": []},
        {"step": 4, "vlm_dpo/skipped_steps": 1.0, "events": []},  # counter only
        {"step": 5, "vlm_dpo/skipped_steps": 2.0, "events": ["skipped: grad norm spike"]},  # both: one skip
        {"step": 6, "vlm_dpo/skipped_steps": 2.0, "events": ["lr back-off 0.1"]},  # neither
        {"step": 7, "events": []},  # counter not logged: no change
        {"step": 8, "vlm_dpo/skipped_steps": 2.0},
    ]
    assert skip_steps(records) == [2, 4, 5]


def test_a_counter_that_first_appears_above_zero_counts_as_skips_at_that_record():
    assert skip_steps([{"step": 10, "vlm_dpo/skipped_steps": 3.0}, {"step": 20, "vlm_dpo/skipped_steps": 3.0}]) == [10]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert 600 <= width <= 2000 and 800 <= height <= 3000, image.size
    assert height > width, "five stacked panels make a portrait figure"


def test_plot_one_run(tmp_path):
    pytest.importorskip("matplotlib")
    from vlm_dpo_plugins.runlog.plot import plot_runs

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 11):
        log.append(step, {"loss": 0.69 - 0.01 * step, "rewards/accuracies": 0.5, "grad_norm": 1.0 + step})
    path = plot_runs({"VLMDPOTrainer": read_metrics(log.path)}, tmp_path / "plots" / "training.png")

    assert path == tmp_path / "plots" / "training.png"
    assert_png(path)


def test_plot_two_runs_with_a_nan_loss_missing_keys_and_skip_events(tmp_path):
    pytest.importorskip("matplotlib")
    from vlm_dpo_plugins.runlog.plot import plot_runs

    stock = [{"step": s, "loss": math.nan if s >= 6 else 0.69, "grad_norm": 10.0**s, "events": []} for s in range(1, 9)]
    plugins = []
    skipped = 0
    for step in range(1, 9):
        events = ["skipped: non-finite loss"] if step in (3, 6) else []
        skipped += bool(events)
        plugins.append(
            {
                "step": step,
                "loss": math.nan if step == 3 else 0.69 - 0.02 * step,
                "rewards/margins": 0.05 * step,
                "grad_norm": "Infinity" if step == 6 else 1.5,  # spelled as in the file, still understood
                "vlm_dpo/skipped_steps": float(skipped),
                "events": events,
            }
        )

    path = plot_runs(
        {"stock trl.DPOTrainer": stock, "VLMDPOTrainer": plugins}, tmp_path / "training.png", title="tiny LLaVA"
    )
    assert_png(path)


def test_plot_leaves_the_callers_matplotlib_backend_and_pyplot_alone(tmp_path):
    pytest.importorskip("matplotlib")
    # A fresh interpreter: other tests may already have imported pyplot in this one.
    script = f"""
import sys, matplotlib
matplotlib.use("svg")
from vlm_dpo_plugins.runlog.plot import plot_runs
plot_runs({{"run": [{{"step": 1, "loss": 0.5}}]}}, {str(tmp_path / "training.png")!r})
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    assert_png(tmp_path / "training.png")


def test_plot_needs_a_run(tmp_path):
    pytest.importorskip("matplotlib")
    from vlm_dpo_plugins.runlog.plot import plot_runs

    with pytest.raises(ValueError, match="at least one run"):
        plot_runs({}, tmp_path / "training.png")


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    from vlm_dpo_plugins.runlog.plot import plot_runs

    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'vlm-dpo-plugins\[trl\]' or pip install matplotlib"):
        plot_runs({"run": [{"step": 1, "loss": 0.5}]}, tmp_path / "training.png")
