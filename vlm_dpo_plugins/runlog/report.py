"""One self-contained HTML page for a run: a plot per metric and the findings, plus each plot as a PNG.

Panels: loss; reward margin; reward accuracy; chosen and rejected rewards; gradient norm
before and after clipping. Skipped steps are dashed red lines and unfreeze events dotted
green ones (labelled with the stage) on every panel; a non-finite value is an ``x`` on the
top border; a metric the run did not log is still drawn, saying so, so a reader sees why
it is empty. The page embeds the PNGs as data URIs: it can be mailed or attached to an
issue as one file, and opens without network access.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.runlog.plot import as_number, as_step, draw_metric, import_matplotlib, skip_steps
from vlm_dpo_plugins.runlog.sources import MISSING_NOTE, RunLog, as_finding, read_run

UNFREEZE_KEY = "vlm_dpo/unfreeze_stage"
PANEL_SIZE_INCHES = (8.0, 3.2)
DPI = 100
LOG_SCALE_SPAN = 100.0  # a wider grad-norm range hides the ordinary steps under the spikes
NOT_LOGGED = "not logged by this run"
LOGGED_ORIGIN = "logged by the run"
REPLAYED_ORIGIN = "replayed from the log"

Record = Mapping[str, Any]


@dataclass(frozen=True)
class Panel:
    name: str
    title: str
    series: tuple[tuple[tuple[str, ...], str, bool], ...]
    """(keys tried in order, label, required) per line; an optional one missing is not reported as missing."""


PANELS = (
    Panel("loss", "loss", ((("loss",), "loss", True),)),
    Panel("margins", "reward margin (chosen - rejected)", ((("rewards/margins",), "margin", True),)),
    Panel("accuracy", "reward accuracy", ((("rewards/accuracies",), "accuracy", True),)),
    Panel(
        "rewards",
        "chosen and rejected rewards",
        ((("rewards/chosen",), "chosen", True), (("rewards/rejected",), "rejected", True)),
    ),
    Panel(
        "grad_norm",
        "gradient norm",
        (
            (("vlm_dpo/grad_norm", "grad_norm"), "before clipping", True),
            (("vlm_dpo/grad_norm_clipped",), "after clipping", False),  # only runs whose guard clips log it
        ),
    ),
)


@dataclass
class ReportResult:
    html_path: Path
    png_paths: dict[str, Path]
    findings: list[dict[str, Any]]
    run: RunLog
    missing: list[str] = field(default_factory=list)
    """Required metrics the run did not log, as ``"key"`` or ``"key or other_key"``."""


@dataclass
class Drawn:
    """What one panel showed, for the page's captions and notes."""

    path: Path
    missing: list[str]
    non_finite: dict[str, list[int]]


def write_report(
    run_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    extra_findings: Callable[[list[dict[str, Any]]], Sequence[Any]] | None = None,
) -> ReportResult:
    """Write ``report.html`` and one PNG per panel into ``output_dir`` (default ``run_dir/vlm-dpo-report``)."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    output = Path(output_dir) if output_dir is not None else run_dir / "vlm-dpo-report"
    output.mkdir(parents=True, exist_ok=True)
    replayed = [as_finding(finding) for finding in extra_findings(run.records)] if extra_findings else []
    findings = merge_findings(run.findings, replayed)
    skipped = skip_steps(run.records)
    unfrozen = unfreeze_events(run.records)
    drawn = {
        panel.name: draw_panel(panel, run.records, skipped, unfrozen, output / f"{panel.name}.png") for panel in PANELS
    }
    html_path = output / "report.html"
    html_path.write_text(render_page(run_dir, run, findings, drawn, skipped, unfrozen), encoding="utf-8")
    missing = [key for panel in drawn.values() for key in panel.missing]
    return ReportResult(html_path, {name: panel.path for name, panel in drawn.items()}, findings, run, missing)


def merge_findings(logged: Sequence[Mapping[str, Any]], replayed: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The run's own findings, then replayed ones of a code the run did not report (a stock run reports none).

    A code the run reported is not repeated from the replay: the run saw it live, with more context.
    """
    merged = [{"origin": LOGGED_ORIGIN, **finding} for finding in logged]
    seen = {(finding["code"], finding.get("step"), finding.get("message")) for finding in merged}
    logged_codes = {finding["code"] for finding in merged}
    for finding in replayed:
        key = (finding["code"], finding.get("step"), finding.get("message"))
        if finding["code"] not in logged_codes and key not in seen:
            seen.add(key)
            merged.append({**finding, "origin": REPLAYED_ORIGIN})
    return sorted(merged, key=lambda f: (f.get("step") is None, f.get("step") or 0))


def unfreeze_events(records: Sequence[Record]) -> list[tuple[int, int]]:
    """``(step, stage reached)`` wherever ``vlm_dpo/unfreeze_stage`` rose; stages count from 0 (nothing unfrozen)."""
    events, previous = [], 0.0
    for record in records:
        stage, step = as_number(record.get(UNFREEZE_KEY)), as_step(record.get("step"))
        if stage is None or step is None or not math.isfinite(stage):
            continue
        if stage > previous:
            events.append((step, int(stage)))
        previous = stage
    return events


def draw_panel(panel: Panel, records: Sequence[Record], skipped, unfrozen, path: Path) -> Drawn:
    figure_class, canvas_class = import_matplotlib()
    figure = figure_class(figsize=PANEL_SIZE_INCHES, dpi=DPI, layout="constrained")
    canvas_class(figure)
    axis = figure.subplots()
    missing, non_finite, drawn_values = [], {}, []
    for index, (keys, label, required) in enumerate(panel.series):
        key = next((k for k in keys if any(as_number(r.get(k)) is not None for r in records)), None)
        if key is None:
            missing += [" or ".join(keys)] if required else []
            continue
        draw_metric(axis, records, key, f"C{index}", label)
        values = [(as_step(r.get("step")), as_number(r.get(key))) for r in records]
        drawn_values += [value for _, value in values if value is not None and math.isfinite(value)]
        bad = [step for step, value in values if value is not None and not math.isfinite(value)]
        if bad:
            non_finite[key] = bad
    _mark_steps(axis, skipped, unfrozen)
    _span_the_run(axis, records)
    if panel.name == "grad_norm":
        _log_scale_if_wide(axis, drawn_values)
    _finish(axis, panel.title, nothing_drawn=not drawn_values and not non_finite)
    figure.savefig(path, format="png")
    return Drawn(path, missing, non_finite)


def _mark_steps(axis, skipped: Sequence[int], unfrozen: Sequence[tuple[int, int]]) -> None:
    # x in data units, y in axes units: full height whatever the metric's range.
    across = axis.get_xaxis_transform()
    if skipped:
        axis.vlines(skipped, 0, 1, transform=across, colors="red", linestyles="dashed", alpha=0.6, label="skipped step")
    if unfrozen:
        steps = [step for step, _ in unfrozen]
        axis.vlines(steps, 0, 1, transform=across, colors="green", linestyles="dotted", linewidth=2, label="unfreeze")
        for step, stage in unfrozen:
            axis.annotate(
                f"unfreeze {stage}",
                xy=(step, 0.97),
                xycoords=across,
                xytext=(3, 0),  # beside the line, not on it
                textcoords="offset points",
                rotation=90,
                ha="left",
                va="top",
                color="green",
                fontsize=8,
            )


def _span_the_run(axis, records: Sequence[Record]) -> None:
    """The same step range on every panel, an empty one included, so they line up when read one above the other."""
    steps = [step for step in (as_step(record.get("step")) for record in records) if step is not None]
    if steps:
        pad = max(0.5, 0.03 * (max(steps) - min(steps)))
        axis.set_xlim(min(steps) - pad, max(steps) + pad)


def _log_scale_if_wide(axis, values: Sequence[float]) -> None:
    if values and min(values) > 0 and max(values) / min(values) > LOG_SCALE_SPAN:
        axis.set_yscale("log")


def _finish(axis, title: str, *, nothing_drawn: bool) -> None:
    axis.set_title(title)
    axis.set_xlabel("step")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.grid(True, alpha=0.3)
    if nothing_drawn:
        axis.set_yticks([])  # an empty panel's default 0..1 scale would read as a logged value
        axis.text(0.5, 0.5, NOT_LOGGED, transform=axis.transAxes, ha="center", va="center", fontsize=14, color="0.35")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small", loc="best")


# -- the page -----------------------------------------------------------------------------------------------------


STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
tr.error td:first-child { color: #b00; font-weight: bold; }
tr.warning td:first-child { color: #a60; font-weight: bold; }
figure { margin: 0 0 1.5em 0; }
img.plot { display: block; border: 1px solid #ddd; }
.missing { color: #a60; }
td code { white-space: nowrap; }
"""


def render_page(run_dir: Path, run: RunLog, findings, drawn: Mapping[str, Drawn], skipped, unfrozen) -> str:
    escape = html.escape
    source = Path(run.source)
    missing = [key for panel in drawn.values() for key in panel.missing]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>vlm-dpo report: {escape(str(run_dir))} ({escape(source.name)})</title>
<style>{STYLE}</style></head>
<body>
<h1>vlm-dpo report: {escape(str(run_dir))}</h1>
<p>Read from <code>{escape(str(source))}</code> ({escape(run.framework)}).</p>
{_summary(run, findings, skipped, unfrozen)}
<h2>Findings</h2>
{_findings_table(findings)}
<h2>Plots</h2>
{"".join(_figure(panel, drawn[panel.name]) for panel in PANELS)}
{_notes(run, drawn, missing)}
</body></html>
"""


def _summary(run: RunLog, findings, skipped, unfrozen) -> str:
    rows = [
        ("logged steps", str(len(run.records))),
        ("last step", str(run.records[-1]["step"]) if run.records else "-"),
        ("final loss", _number(_last(run.records, "loss"))),
        ("final reward accuracy", _number(_last(run.records, "rewards/accuracies"))),
        ("skipped steps", str(len(skipped))),
        ("unfreeze events", ", ".join(f"step {step} (stage {stage})" for step, stage in unfrozen) or "none"),
        ("findings", str(len(findings))),
    ]
    cells = "".join(f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>" for name, value in rows)
    return f'<table class="summary">{cells}</table>'


def _findings_table(findings: Sequence[Mapping[str, Any]]) -> str:
    if not findings:
        return "<p>No findings.</p>"
    escape = html.escape
    rows = "".join(
        f'<tr class="{escape(str(f["severity"]))}"><td>{escape(str(f["severity"]))}</td>'
        f"<td><code>{escape(str(f['code']))}</code></td>"
        f"<td>{escape('' if f.get('step') is None else str(f['step']))}</td>"
        f"<td>{escape(str(f['message']))}</td><td>{escape(str(f['fix']))}</td>"
        f"<td>{escape(str(f.get('origin', '')))}</td></tr>\n"
        for f in findings
    )
    header = "<tr><th>severity</th><th>code</th><th>step</th><th>what was seen</th><th>fix</th><th>from</th></tr>"
    return f'<table class="findings">{header}\n{rows}</table>'


def _figure(panel: Panel, drawn: Drawn) -> str:
    escape = html.escape
    absent = f"{NOT_LOGGED}: {', '.join(drawn.missing)}" if drawn.missing else ""
    alt = f"{panel.title} over training steps" + (f" ({absent})" if absent else "")
    data = base64.b64encode(drawn.path.read_bytes()).decode("ascii")
    caption = escape(panel.title) + f" ({escape(drawn.path.name)})"
    if absent:
        caption += f' <span class="missing">{escape(absent)}</span>'
    width, height = (round(size * DPI) for size in PANEL_SIZE_INCHES)
    return (
        f'<figure><img class="plot" data-metric="{escape(panel.name)}" alt="{escape(alt)}" width="{width}" '
        f'height="{height}" src="data:image/png;base64,{data}">\n<figcaption>{caption}</figcaption></figure>\n'
    )


def _notes(run: RunLog, drawn: Mapping[str, Drawn], missing: Sequence[str]) -> str:
    # The panels name the missing metrics more precisely (pre-clip norm under either key) than the reader's note.
    notes = [note for note in run.notes if not note.startswith(MISSING_NOTE)]
    if missing:
        notes.append(f"metrics {NOT_LOGGED}: {', '.join(missing)}")
    non_finite = {key: steps for panel in drawn.values() for key, steps in panel.non_finite.items()}
    notes += [
        f"non-finite {key} at step(s) {', '.join(map(str, steps))} (an x on the top border of its plot)"
        for key, steps in non_finite.items()
    ]
    if not notes:
        return ""
    return "<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(note)}</li>" for note in notes) + "</ul>"


def _last(records: Sequence[Record], key: str) -> Any:
    return next((record[key] for record in reversed(records) if key in record), None)


def _number(value: Any) -> str:
    number = as_number(value)
    return "-" if number is None else f"{number:.4g}"
