"""``vlm_dpo_findings.jsonl``: every finding of a run, one JSON object per line, beside the framework's own logs.

Each framework logs metrics its own way (``trainer_state.json``, ``trainer_log.jsonl``,
``logging.jsonl``), and not all of them can carry text; this file is the same everywhere,
so ``vlm-dpo report`` and a user's ``jq`` find the findings in one place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.types import Finding

FINDINGS_FILE = "vlm_dpo_findings.jsonl"


def finding_record(finding: Finding, step: int | None = None) -> dict[str, Any]:
    return {
        "step": finding.step if finding.step is not None else step,
        "code": finding.code,
        "severity": finding.severity.value,
        "message": finding.message,
        "fix": finding.fix,
        "row": finding.row,
        "field": finding.field,
        "source": finding.source,
    }


def append_finding(output_dir: str | Path | None, finding: Finding, step: int | None = None) -> None:
    if not output_dir:
        return
    path = Path(output_dir) / FINDINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as file:  # one whole line per write: a killed run keeps the rest
        file.write(json.dumps(finding_record(finding, step)) + "\n")


def read_findings(path: str | Path) -> list[dict[str, Any]]:
    """The records of a findings file. A last line cut off by a killed run is ignored; any other bad line raises."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was interrupted
                break
            raise ValueError(f"{path}: line {number} is not a JSON finding") from None
        if not isinstance(record, dict) or "code" not in record:
            raise ValueError(f"{path}: line {number} is not a finding (expected a JSON object with a 'code')")
        records.append(record)
    return records


def as_records(findings: Iterable[Finding]) -> list[dict[str, Any]]:
    return [finding_record(finding) for finding in findings]
