"""The doctor's output: a summary table and the findings for people, or one JSON document for scripts."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, TextIO

from vlm_dpo_plugins.doctor.setup import TrainingSetup
from vlm_dpo_plugins.preference_data.scan import DataReport
from vlm_dpo_plugins.runlog.findings import finding_record
from vlm_dpo_plugins.types import Finding, Severity

SHOWN_ROWS = 8


def print_data_report(report: DataReport, out: TextIO, limit: int | None) -> None:
    layouts = ", ".join(f"{layout} {count}" for layout, count in report.layouts.most_common()) or "none readable"
    print(f"data: {report.path}: {report.rows} rows ({layouts}), {report.distinct_images} distinct images", file=out)
    if not report.findings:
        print("  no findings", file=out)
        return
    by_code: dict[tuple[str, str], list[Finding]] = defaultdict(list)
    for finding in report.findings:
        by_code[(finding.code, finding.severity.value)].append(finding)
    print(f"  {'check':<24} {'severity':<8} {'rows':>6}  rows", file=out)
    for (code, severity), found in sorted(by_code.items(), key=lambda item: (item[0][1] != "error", item[0][0])):
        rows = sorted({f.row for f in found if f.row is not None})
        shown = ", ".join(str(row) for row in rows[:SHOWN_ROWS]) + (" ..." if len(rows) > SHOWN_ROWS else "")
        print(f"  {code:<24} {severity:<8} {len(rows):>6}  {shown}", file=out)
    print_findings(report.findings, out, limit)


def print_setup_report(setup: TrainingSetup, findings: Sequence[Finding], out: TextIO) -> None:
    kind = "DPO" if setup.dpo else "not a DPO stage"
    tuning = "LoRA" if setup.lora else "full"
    print(f"config: {setup.source} ({setup.framework}, {kind}, {tuning})", file=out)
    if not findings:
        print("  no findings", file=out)
    print_findings(findings, out, None)


def print_findings(findings: Sequence[Finding], out: TextIO, limit: int | None) -> None:
    shown = findings if limit is None else findings[:limit]
    for finding in shown:
        print(f"  {finding}", file=out)
    if len(shown) < len(findings):
        print(f"  ... {len(findings) - len(shown)} more (--all shows every finding, --json writes them all)", file=out)


def print_verdict(findings: Sequence[Finding], out: TextIO) -> None:
    errors = sum(f.severity is Severity.ERROR for f in findings)
    warnings = sum(f.severity is Severity.WARNING for f in findings)
    verdict = "FAIL" if errors else "ok"
    print(f"{verdict}: {errors} error(s), {warnings} warning(s)", file=out)


def json_document(data: DataReport | None, setup: TrainingSetup | None, setup_findings: Sequence[Finding]) -> str:
    document: dict[str, Any] = {}
    findings: list[Finding] = []
    if data is not None:
        document["data"] = {
            "path": str(data.path),
            "rows": data.rows,
            "layouts": dict(data.layouts),
            "distinct_images": data.distinct_images,
            "findings": [finding_record(f) for f in data.findings],
        }
        findings += data.findings
    if setup is not None:
        document["config"] = {
            "path": str(setup.source),
            "framework": setup.framework,
            "findings": [finding_record(f) for f in setup_findings],
        }
        findings += setup_findings
    document["errors"] = sum(f.severity is Severity.ERROR for f in findings)
    document["warnings"] = sum(f.severity is Severity.WARNING for f in findings)
    return json.dumps(document, indent=2)
