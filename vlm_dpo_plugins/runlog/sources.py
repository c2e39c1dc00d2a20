"""A run's logged metrics and findings, read from whichever framework wrote them, in one normalised form.

Looked for in a run folder, first match wins:

- ``metrics.jsonl`` (``vlm-dpo train``, :class:`~vlm_dpo_plugins.runlog.metrics.MetricsLog`);
- ``logging.jsonl`` (ms-swift; ``global_step/max_steps`` is ``"3/10"``);
- ``trainer_log.jsonl`` (LLaMA-Factory; ``current_steps``, ``lr``) — its ``trainer_state.json``
  is preferred for the metrics when present, since it keeps every logged key;
- ``trainer_state.json`` (Transformers/TRL ``log_history``), in the folder or its newest
  ``checkpoint-N``.

Findings come from ``vlm_dpo_findings.jsonl`` when the adapters wrote one, else from the
``vlm_dpo_findings`` entries of the log lines (strings as ``str(Finding)`` prints them).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.errors import VLMDPOError
from vlm_dpo_plugins.runlog.findings import FINDINGS_FILE, read_findings
from vlm_dpo_plugins.runlog.metrics import NON_FINITE_SPELLINGS, read_metrics

FINDINGS_KEY = "vlm_dpo_findings"
# LLaMA-Factory's trainer_log.jsonl: its "reward" is the chosen reward, its "accuracy" the reward accuracy.
RENAMED = {"lr": "learning_rate", "reward": "rewards/chosen", "accuracy": "rewards/accuracies"}
FINDING_LINE = re.compile(r"^\[(?P<severity>\w+)\] (?P<code>[\w-]+)(?: \((?P<where>[^)]*)\))?: (?P<rest>.*)$", re.S)
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


class RunLogError(VLMDPOError, ValueError):
    """Nothing readable in the folder given."""


@dataclass
class RunLog:
    source: Path
    framework: str
    records: list[dict[str, Any]]
    findings: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_run(run_dir: str | Path) -> RunLog:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunLogError(f"{run_dir} is not a folder; pass the run's output_dir")
    if (run_dir / "metrics.jsonl").is_file():
        run = RunLog(run_dir / "metrics.jsonl", "vlm-dpo", _sorted(read_metrics(run_dir / "metrics.jsonl")))
    elif (run_dir / "logging.jsonl").is_file():
        run = _from_json_lines(run_dir / "logging.jsonl", "swift", _swift_step)
    elif (run_dir / "trainer_log.jsonl").is_file():
        run = _from_json_lines(run_dir / "trainer_log.jsonl", "llamafactory", lambda line: line.get("current_steps"))
        state = _trainer_state(run_dir)
        if state is not None:
            run.records, run.source = _state_records(state), state
    else:
        state = _trainer_state(run_dir)
        if state is None:
            raise RunLogError(
                f"no training log in {run_dir}: looked for metrics.jsonl, logging.jsonl (ms-swift), "
                "trainer_log.jsonl (LLaMA-Factory) and trainer_state.json (Transformers/TRL, also in checkpoint-N/)"
            )
        run = RunLog(state, "trl", _state_records(state))
    if (run_dir / FINDINGS_FILE).is_file():
        run.findings = read_findings(run_dir / FINDINGS_FILE)
    if not run.records:
        run.notes.append(f"{run.source.name} holds no training step (no line with a loss)")
    return run


def _trainer_state(run_dir: Path) -> Path | None:
    if (run_dir / "trainer_state.json").is_file():
        return run_dir / "trainer_state.json"
    checkpoints = [
        (int(m.group(1)), path) for path in run_dir.glob("checkpoint-*") if (m := CHECKPOINT.search(path.name))
    ]
    for _, checkpoint in sorted(checkpoints, reverse=True):
        if (checkpoint / "trainer_state.json").is_file():
            return checkpoint / "trainer_state.json"
    return None


def _state_records(path: Path) -> list[dict[str, Any]]:
    history = json.loads(path.read_text(encoding="utf-8")).get("log_history", [])
    return _sorted(_normalised(entry, entry.get("step")) for entry in history if "loss" in entry)


def _from_json_lines(path: Path, framework: str, step_of) -> RunLog:
    run = RunLog(path, framework, [])
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            run.notes.append(f"{path.name} line {number} is not JSON; left out")
            continue
        step = step_of(entry)
        for finding in entry.get(FINDINGS_KEY) or ():
            run.findings.append(_finding(finding, step))
        if "loss" in entry and step is not None:
            run.records.append(_normalised(entry, step))
    run.records = _sorted(run.records)
    return run


def _swift_step(entry: dict[str, Any]) -> int | None:
    progress = entry.get("global_step/max_steps")
    if isinstance(progress, str) and "/" in progress:
        return int(progress.split("/", 1)[0])
    return entry.get("step")


def _normalised(entry: dict[str, Any], step: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"step": int(step)}
    for key, value in entry.items():
        if key in (FINDINGS_KEY, "step", "current_steps"):
            continue
        key = RENAMED.get(key, key)
        if isinstance(value, str) and value in NON_FINITE_SPELLINGS:
            value = NON_FINITE_SPELLINGS[value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            record.setdefault(key, float(value))
        elif key == "events":
            record[key] = value
    return record


def _finding(value: Any, step: int | None) -> dict[str, Any]:
    if isinstance(value, dict):
        return {"step": step, **value}
    text = str(value)
    match = FINDING_LINE.match(text)
    if match is None:
        return {"step": step, "code": "finding", "severity": "warning", "message": text, "fix": ""}
    message, _, fix = match.group("rest").partition(" Fix: ")
    where = match.group("where") or ""
    logged_step = re.search(r"step (\d+)", where)
    return {
        "step": int(logged_step.group(1)) if logged_step else step,
        "code": match.group("code"),
        "severity": match.group("severity"),
        "message": message,
        "fix": fix,
    }


def _sorted(records) -> list[dict[str, Any]]:
    return sorted(
        (r for r in records if isinstance(r.get("step"), (int, float)) and not math.isnan(r["step"])),
        key=lambda r: r["step"],
    )
