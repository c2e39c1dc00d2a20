"""Where skipped and warned rows go: counts, a capped log, and a JSONL file with one finding per line."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vlm_dpo_plugins.collation.policy import PairCheckError
from vlm_dpo_plugins.types import Finding

REPORT_NAME = "collation_report.jsonl"
MAX_LOGGED_FINDINGS = 50

logger = logging.getLogger("vlm_dpo_plugins.collation")


@dataclass
class CollationSummary:
    """What the checks saw over many batches (a run, or a dataset pre-scan)."""

    rows_checked: int = 0
    skipped_rows: set[int] = field(default_factory=set)
    warned_rows: set[int] = field(default_factory=set)
    """Rows kept with a warning (a row that was also skipped counts as skipped)."""
    errors: list[Finding] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    """``(check, action)`` to how many findings."""
    report_path: str | None = None

    def add(self, decided: Iterable[tuple[Finding, str]], rows_checked: int) -> None:
        self.rows_checked += rows_checked
        for finding, action in decided:
            self.counts[(finding.code, action)] += 1
            if action == "error":
                self.errors.append(finding)
            elif action == "skip":
                self.skipped_rows.add(finding.row)
                self.warned_rows.discard(finding.row)
            elif action == "warn" and finding.row not in self.skipped_rows:
                self.warned_rows.add(finding.row)

    def raise_for_errors(self) -> None:
        if self.errors:
            raise PairCheckError(self.errors)

    def __str__(self) -> str:
        lines = [
            f"collation checks: {self.rows_checked} row(s) checked, {len(self.errors)} error(s), "
            f"{len(self.skipped_rows)} row(s) skipped, {len(self.warned_rows)} row(s) with warnings"
        ]
        lines += [f"  {code}: {count} {action}" for (code, action), count in sorted(self.counts.items())]
        if self.report_path and (self.skipped_rows or self.warned_rows):
            lines.append(f"  report: {self.report_path}")
        return "\n".join(lines)


class ReportFile:
    """Appends skipped and warned findings as JSON lines; a run's first write to a path starts that file afresh."""

    def __init__(self) -> None:
        self.started: set[Path] = set()
        self.resumed = False
        self.logged: set[tuple[int | None, str, str | None]] = set()
        self.path: Path | None = None

    @staticmethod
    def resolve(configured: str | None, output_dir: str | None) -> Path:
        return Path(configured) if configured else Path(output_dir or ".") / REPORT_NAME

    def write(self, decided: list[tuple[Finding, str]], path: Path, origin: str) -> None:
        records = [(finding, action) for finding, action in decided if action in ("skip", "warn")]
        if not records:
            return
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a" if path in self.started or self.resumed else "w") as handle:
            for finding, action in records:
                record = {
                    "row": finding.row, "action": action, "check": finding.code, "field": finding.field,
                    "message": finding.message, "fix": finding.fix, "source": finding.source, "origin": origin,
                }
                handle.write(json.dumps(record) + "\n")
        self.started.add(path)
        self._log(records)

    def _log(self, records: list[tuple[Finding, str]]) -> None:
        for finding, action in records:
            key = (finding.row, finding.code, finding.field)
            if key in self.logged:
                continue
            self.logged.add(key)
            if len(self.logged) <= MAX_LOGGED_FINDINGS:
                verb = "skipped" if action == "skip" else "kept"
                logger.warning("%s (row %s): %s", verb, finding.row, finding)
            if len(self.logged) == MAX_LOGGED_FINDINGS:
                logger.warning("further collation findings are only written to %s", self.path)
