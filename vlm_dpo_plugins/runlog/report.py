"""One self-contained HTML page for a run: a plot per metric and the findings, plus each plot as a PNG.

Panels: loss; reward margin; reward accuracy; chosen and rejected rewards; gradient norm
before and after clipping. Skipped steps are dashed red lines and unfreeze events dotted
green ones on every panel; a non-finite value is an ``x`` on the top border; a metric the
run did not log is still drawn, saying so, so a reader sees why it is empty.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.runlog.findings import as_records
from vlm_dpo_plugins.runlog.plot import as_number, as_step, draw_metric, import_matplotlib, skip_steps
from vlm_dpo_plugins.runlog.sources import RunLog, read_run

UNFREEZE_KEY = "vlm_dpo/unfreeze_stage"
PANEL_SIZE_INCHES = (8.0, 3.2)
DPI = 100
LOG_SCALE_SPAN = 100.0


@dataclass(frozen=True)
class Panel:
    name: str
    title: str
    series: tuple[tuple[tuple[str, ...], str], ...]
    """(keys tried in order, label) per line."""


PANELS = (
    Panel("loss", "loss", ((("loss",), "loss"),)),
    Panel("margins", "reward margin (chosen - rejected)", ((("rewards/margins",), "margin"),)),
    Panel("accuracy", "reward accuracy", ((("rewards/accuracies",), "accuracy"),)),
    Panel(
        "rewards", "chosen and rejected rewards", ((("rewards/chosen",), "chosen"), (("rewards/rejected",), "rejected"))
    ),
    Panel(
        "grad_norm",
        "gradient norm",
        ((("vlm_dpo/grad_norm", "grad_norm"), "before clipping"), (("vlm_dpo/grad_norm_clipped",), "after clipping")),
    ),
)


@dataclass
class ReportResult:
    html_path: Path
    png_paths: dict[str, Path]
    findings: list[dict[str, Any]]
    run: RunLog
    missing: list[str] = field(default_factory=list)


def write_report(
    run_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    extra_findings: Callable[[list[dict[str, Any]]], Sequence[Any]] | None = None,
) -> ReportResult:
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    output = Path(output_dir) if output_dir is not None else run_dir / "vlm-dpo-report"
    output.mkdir(parents=True, exist_ok=True)
    findings = _merged(run.findings, as_records(extra_findings(run.records)) if extra_findings else [])
    skipped = skip_steps(run.records)
    unfrozen = _unfreeze_steps(run.records)
    pngs, missing = {}, []
    for panel in PANELS:
        path, absent = _draw(panel, run.records, skipped, unfrozen, output / f"{panel.name}.png")
        pngs[panel.name] = path
        missing += absent
    html_path = output / "report.html"
    html_path.write_text(_page(run_dir, run, findings, pngs, missing, skipped, unfrozen), encoding="utf-8")
    return ReportResult(html_path, pngs, findings, run, missing)


def _merged(logged: list[dict[str, Any]], replayed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's own findings, then replayed ones of a code the run did not report (a stock run reports none)."""
    seen = {finding.get("code") for finding in logged}
    extra = [dict(finding, source="replayed from the log") for finding in replayed if finding["code"] not in seen]
    return sorted(logged + extra, key=lambda f: (f.get("step") is None, f.get("step") or 0))


def _unfreeze_steps(records: Sequence[Mapping[str, Any]]) -> list[int]:
    steps, previous = [], None
    for record in records:
        stage = as_number(record.get(UNFREEZE_KEY))
        if stage is None:
            continue
        if previous is not None and stage > previous:
            steps.append(as_step(record["step"]))
        previous = stage
    return steps


def _draw(panel: Panel, records, skipped: list[int], unfrozen: list[int], path: Path) -> tuple[Path, list[str]]:
    figure_class, canvas_class = import_matplotlib()
    figure = figure_class(figsize=PANEL_SIZE_INCHES, dpi=DPI, layout="constrained")
    canvas_class(figure)
    axis = figure.subplots()
    missing, drawn_values = [], []
    for index, (keys, label) in enumerate(panel.series):
        key = next((k for k in keys if any(as_number(r.get(k)) is not None for r in records)), None)
        if key is None:
            missing.append(" or ".join(keys))
            continue
        draw_metric(axis, records, key, f"C{index}", label)
        drawn_values += [as_number(r.get(key)) for r in records]
    for steps, colour, style, label in (
        (skipped, "red", "dashed", "skipped step"),
        (unfrozen, "green", "dotted", "unfreeze"),
    ):
        if steps:
            axis.vlines(steps, 0, 1, transform=axis.get_xaxis_transform(), colors=colour, linestyles=style, label=label)
    finite = [v for v in drawn_values if v is not None and math.isfinite(v)]
    if panel.name == "grad_norm" and finite and min(finite) > 0 and max(finite) / min(finite) > LOG_SCALE_SPAN:
        axis.set_yscale("log")
    axis.set_title(panel.title)
    axis.set_xlabel("step")
    axis.grid(True, alpha=0.3)
    if missing and len(missing) == len(panel.series):
        axis.text(
            0.5,
            0.5,
            "not logged by this run",
            transform=axis.transAxes,
            ha="center",
            va="center",
            fontsize=14,
            alpha=0.7,
        )
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small", loc="best")
    figure.savefig(path, format="png")
    return path, missing


def _page(run_dir, run: RunLog, findings, pngs, missing, skipped, unfrozen) -> str:
    escape = html.escape
    last = run.records[-1] if run.records else {}
    summary = [
        ("source", f"{run.source} ({run.framework})"),
        ("logged steps", str(len(run.records))),
        ("last step", str(last.get("step", "-"))),
        ("final loss", _number(last.get("loss"))),
        ("final reward accuracy", _number(last.get("rewards/accuracies"))),
        ("skipped steps", str(len(skipped))),
        ("unfreeze events", ", ".join(map(str, unfrozen)) or "none"),
        ("findings", str(len(findings))),
    ]
    rows = "\n".join(
        f"<tr class='{escape(str(f.get('severity', '')))}'><td>{escape(str(f.get('severity', '')))}</td>"
        f"<td><code>{escape(str(f.get('code', '')))}</code></td><td>{escape(str(f.get('step', '') or ''))}</td>"
        f"<td>{escape(str(f.get('message', '')))}</td><td>{escape(str(f.get('fix', '')))}</td>"
        f"<td>{escape(str(f.get('source', 'logged by the run')))}</td></tr>"
        for f in findings
    )
    findings_html = (
        "<table class='findings'><tr><th>severity</th><th>code</th><th>step</th><th>what was seen</th><th>fix</th>"
        f"<th>from</th></tr>\n{rows}\n</table>"
        if findings
        else "<p>No findings.</p>"
    )
    plots = "\n".join(
        f"<figure><img class='plot' data-metric='{escape(name)}' alt='{escape(panel.title)}' width='800' "
        f"height='320' src='data:image/png;base64,{base64.b64encode(pngs[name].read_bytes()).decode()}'>"
        f"<figcaption>{escape(panel.title)} ({escape(name)}.png)</figcaption></figure>"
        for panel in PANELS
        for name in [panel.name]
    )
    notes = [*run.notes] + ([f"metrics not logged by this run: {', '.join(missing)}"] if missing else [])
    notes_html = "".join(f"<li>{escape(note)}</li>" for note in notes)
    summary_html = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in summary)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vlm-dpo report: {escape(str(run_dir))}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
tr.error td:first-child {{ color: #b00; font-weight: bold; }}
tr.warning td:first-child {{ color: #a60; font-weight: bold; }}
figure {{ margin: 0 0 1.5em 0; }}
img.plot {{ display: block; border: 1px solid #ddd; }}
</style></head>
<body>
<h1>vlm-dpo report</h1>
<p>{escape(str(run_dir))}</p>
<table class="summary">{summary_html}</table>
<h2>Findings</h2>
{findings_html}
<h2>Plots</h2>
{plots}
{"<h2>Notes</h2><ul>" + notes_html + "</ul>" if notes else ""}
</body></html>
"""


def _number(value: Any) -> str:
    number = as_number(value)
    return "-" if number is None else f"{number:.4g}"
