"""One PNG that shows how a run went: loss, reward margin and accuracy, gradient norm and skipped steps.

Several runs (e.g. stock ``trl.DPOTrainer`` next to the plugins' trainer) share the
axes, one colour each, so the difference the plugins make is visible at a glance.
matplotlib is imported only when a plot is drawn, and only through its
object-oriented API with the Agg canvas: pyplot and the process-wide backend are
left alone, so plotting never disturbs an application that set up its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SKIP_COUNTER_KEY = "vlm_dpo/skipped_steps"
SKIP_EVENT_PREFIX = "skipped"
METRIC_PANELS = (
    ("loss", "loss"),
    ("rewards/margins", "reward margin"),
    ("rewards/accuracies", "reward accuracy"),
    ("grad_norm", "grad norm"),
)
LOG_SCALE_SPAN = 100.0  # a grad-norm range wider than this hides the ordinary steps under the spikes
FIGURE_SIZE_INCHES = (9.0, 12.0)
DPI = 100

Record = Mapping[str, Any]


def skip_steps(records: Sequence[Record]) -> list[int]:
    """The steps at which a run skipped an optimizer step (see :func:`skipped_per_record`)."""
    return [step for step, skipped in skipped_per_record(records) if skipped > 0]


def skipped_per_record(records: Sequence[Record]) -> list[tuple[int, int]]:
    """``(step, steps skipped since the previous record)`` for each record with a step.

    Two signals count: an event starting with ``"skipped"`` (one step) and an
    increase of the cumulative ``vlm_dpo/skipped_steps`` counter, which starts at 0
    and can grow by more than one between two logged records. When both report
    the same record the larger count is taken, so one skip is never counted twice.
    """
    result = []
    previous_counter = 0.0
    for record in records:
        step = as_step(record.get("step"))
        if step is None:
            continue
        from_event = 1 if has_skip_event(record) else 0
        counter = as_number(record.get(SKIP_COUNTER_KEY))
        from_counter = 0
        if counter is not None and math.isfinite(counter):
            from_counter = max(0, int(round(counter - previous_counter)))
            previous_counter = counter
        result.append((step, max(from_event, from_counter)))
    return result


def has_skip_event(record: Record) -> bool:
    events = record.get("events") or ()
    return any(isinstance(event, str) and event.startswith(SKIP_EVENT_PREFIX) for event in events)


def as_step(value: Any) -> int | None:
    number = as_number(value)
    return int(number) if number is not None and math.isfinite(number) else None


def as_number(value: Any) -> float | None:
    """A float for anything numeric (including the "NaN"/"Infinity" spellings); None for a gap."""
    if value is None or isinstance(value, (list, tuple, dict)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def plot_runs(runs: Mapping[str, Sequence[Record]], path: str | Path, *, title: str | None = None) -> Path:
    """Draw every run's records into one PNG at ``path`` (parent folders are created); returns the path.

    Panels, top to bottom, sharing the step axis: ``loss``, ``rewards/margins``,
    ``rewards/accuracies``, ``grad_norm`` (log scale when it spans more than 100x)
    and the cumulative number of skipped steps. A missing key is a gap; a
    non-finite value is an ``x`` at the top of its panel; each skipped step is a
    dashed vertical line in the run's colour across every panel.
    """
    if not runs:
        raise ValueError("plot_runs needs at least one run, e.g. {'VLMDPOTrainer': read_metrics(path)}")
    figure_class, canvas_class = import_matplotlib()
    figure = figure_class(figsize=FIGURE_SIZE_INCHES, dpi=DPI, layout="constrained")
    canvas_class(figure)
    axes = figure.subplots(len(METRIC_PANELS) + 1, 1, sharex=True)
    metric_axes, skip_axis = axes[:-1], axes[-1]

    for index, (label, records) in enumerate(runs.items()):
        colour = f"C{index % 10}"
        ordered = sorted((r for r in records if as_step(r.get("step")) is not None), key=lambda r: as_step(r["step"]))
        for axis, (key, _) in zip(metric_axes, METRIC_PANELS):
            draw_metric(axis, ordered, key, colour, label)
        draw_skips(axes, skip_axis, ordered, colour, label)

    for axis, (key, name) in zip(metric_axes, METRIC_PANELS):
        finish_panel(axis, name, key)
    use_log_scale_for_wide_range(metric_axes[-1], [r.get("grad_norm") for records in runs.values() for r in records])
    finish_panel(skip_axis, "skipped steps (cumulative)", None)
    skip_axis.yaxis.get_major_locator().set_params(integer=True)
    skip_axis.set_xlabel("step")
    if title:
        figure.suptitle(title)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "plotting a run needs matplotlib: pip install 'vlm-dpo-plugins[trl]' or pip install matplotlib"
        ) from error
    return Figure, FigureCanvasAgg


def draw_metric(axis, records: Sequence[Record], key: str, colour: str, label: str) -> None:
    steps, values, non_finite_steps = [], [], []
    for record in records:
        value = as_number(record.get(key))
        if value is None:
            continue
        step = as_step(record["step"])
        steps.append(step)
        values.append(value if math.isfinite(value) else math.nan)  # NaN breaks the line: a visible gap
        if not math.isfinite(value):
            non_finite_steps.append(step)
    if steps:
        axis.plot(steps, values, color=colour, label=label, marker="." if len(steps) <= 50 else None)
    if non_finite_steps:
        # x in data units, y in axes units: on the top border, above any finite value whatever the range.
        axis.plot(
            non_finite_steps,
            [1.0] * len(non_finite_steps),
            linestyle="none",
            marker="x",
            markersize=8,
            color=colour,
            transform=axis.get_xaxis_transform(),
            clip_on=False,
            label=f"{label}: non-finite {key}",
        )


def draw_skips(all_axes, skip_axis, records: Sequence[Record], colour: str, label: str) -> None:
    counts = skipped_per_record(records)
    if not counts:
        return
    skipped_at = [step for step, skipped in counts if skipped > 0]
    if skipped_at:
        for axis in all_axes:
            axis.vlines(
                skipped_at, 0, 1, transform=axis.get_xaxis_transform(), colors=colour, linestyles="dashed", alpha=0.4
            )
    steps = [step for step, _ in counts]
    cumulative = []
    total = 0
    for _, skipped in counts:
        total += skipped
        cumulative.append(total)
    skip_axis.step(steps, cumulative, where="post", color=colour, label=label)


def finish_panel(axis, name: str, key: str | None) -> None:
    axis.set_ylabel(name)
    axis.grid(True, alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small", loc="best")
    elif key is not None:
        axis.text(0.5, 0.5, f"no '{key}' logged", transform=axis.transAxes, ha="center", va="center", alpha=0.6)


def use_log_scale_for_wide_range(axis, raw_values: Sequence[Any]) -> None:
    values = [v for v in map(as_number, raw_values) if v is not None and math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > LOG_SCALE_SPAN:
        axis.set_yscale("log")
