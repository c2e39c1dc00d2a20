"""A run's logged metrics and findings, read from whichever framework wrote them, in one normalised form.

Looked for in a run folder (then in its newest ``checkpoint-N/``), first match wins:

- ``metrics.jsonl`` (``vlm-dpo train``, :class:`~vlm_dpo_plugins.runlog.metrics.MetricsLog`);
- ``logging.jsonl`` (ms-swift; the step is the part of ``global_step/max_steps`` before the slash);
- ``trainer_log.jsonl`` (LLaMA-Factory; ``current_steps``, ``lr``) — its ``trainer_state.json`` is
  preferred for the metrics when present, since it keeps every logged key;
- ``trainer_state.json`` (Transformers/TRL ``log_history``).

Findings come from ``vlm_dpo_findings.jsonl`` when the adapters wrote one, else from the
``vlm_dpo_findings`` entries of the log lines (dicts, or strings as ``str(Finding)`` prints them).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.errors import VLMDPOError
from vlm_dpo_plugins.runlog.findings import FINDINGS_FILE, read_findings
from vlm_dpo_plugins.runlog.metrics import NON_FINITE_SPELLINGS, read_metrics

FINDINGS_KEY = "vlm_dpo_findings"
# LLaMA-Factory's trainer_log.jsonl copies TRL's rewards/accuracies as "accuracy". Its "reward" is PPO's
# mean reward, not the chosen reward, so it keeps its name.
RENAMED = {"lr": "learning_rate", "accuracy": "rewards/accuracies"}
# Progress bookkeeping, not metrics: plotted against the step they would only repeat it.
NOT_METRICS = frozenset({"step", "current_steps", "total_steps", "percentage", "global_step/max_steps", FINDINGS_KEY})
# What a DPO run is expected to log; alternatives separated, any one of them will do.
EXPECTED_METRICS = (
    ("loss",),
    ("rewards/margins",),
    ("rewards/accuracies",),
    ("rewards/chosen",),
    ("rewards/rejected",),
    ("grad_norm", "vlm_dpo/grad_norm"),
)
MISSING_NOTE = "not logged by this run: "
FINDING_FIELDS = ("code", "severity", "message", "fix")
FINDING_LINE = re.compile(r"^\[(?P<severity>\w+)\] (?P<code>[\w./-]+)(?: \((?P<where>[^)]*)\))?: (?P<rest>.*)$", re.S)
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
LOOKED_FOR = (
    "metrics.jsonl (vlm-dpo train), logging.jsonl (ms-swift), trainer_log.jsonl (LLaMA-Factory) and "
    "trainer_state.json (Transformers/TRL), in the folder and its newest checkpoint-N/"
)


class RunLogError(VLMDPOError, ValueError):
    """Nothing readable in the folder given; the message names the folder and the files looked for."""


@dataclass
class RunLog:
    source: str
    """The file the metrics were read from."""
    framework: str
    """"vlm-dpo", "swift", "llamafactory" or "trl"."""
    records: list[dict[str, Any]]
    """One per logged training step, sorted by step: ``{"step": int, <metric>: float, ..., ["events": [...]]}``."""
    findings: list[dict[str, Any]] = field(default_factory=list)
    """What the run itself logged: at least step, code, severity, message and fix."""
    notes: list[str] = field(default_factory=list)
    """What could not be read: bad lines, metrics the run did not log."""


def read_run(run_dir: str | Path) -> RunLog:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunLogError(f"{run_dir} is not a folder; pass the run's output_dir (looked for {LOOKED_FOR})")
    for name, reader in READERS:
        path = find_log(run_dir, name)
        if path is not None:
            run = reader(run_dir, path)
            break
    else:
        raise RunLogError(f"no training log in {run_dir}: looked for {LOOKED_FOR}")
    findings_file = find_log(run_dir, FINDINGS_FILE)
    if findings_file is not None:  # every finding once, with its step, whatever the framework could log
        run.findings = _guarded(read_findings, findings_file)
    run.findings = _unique([as_finding(finding) for finding in run.findings])
    run.notes += _missing_notes(run)
    return run


def find_log(run_dir: Path, name: str) -> Path | None:
    """``run_dir/name``, else the newest ``checkpoint-N/name`` (a run killed before its final save has only those)."""
    if (run_dir / name).is_file():
        return run_dir / name
    checkpoints = [
        (int(m.group(1)), path) for path in run_dir.glob("checkpoint-*") if (m := CHECKPOINT.search(path.name))
    ]
    for _, checkpoint in sorted(checkpoints, reverse=True):
        if (checkpoint / name).is_file():
            return checkpoint / name
    return None


def _metrics_jsonl(run_dir: Path, path: Path) -> RunLog:
    entries = _guarded(read_metrics, path)
    return _collect(RunLog(str(path), "vlm-dpo", []), entries, lambda entry: entry.get("step"), training=lambda _: True)


def _swift(run_dir: Path, path: Path) -> RunLog:
    run = RunLog(str(path), "swift", [])
    return _collect(run, _json_lines(path, run.notes), _swift_step, training=lambda entry: "loss" in entry)


def _llamafactory(run_dir: Path, path: Path) -> RunLog:
    run = RunLog(str(path), "llamafactory", [])
    _collect(run, _json_lines(path, run.notes), lambda entry: entry.get("current_steps"), lambda e: "loss" in e)
    state_path = find_log(run_dir, "trainer_state.json")
    if state_path is None:
        return run
    state = _trainer_state(run_dir, state_path)
    last_saved = state.records[-1]["step"] if state.records else -1
    newer = [record for record in run.records if record["step"] > last_saved]
    if newer:  # the state is a checkpoint's, saved before the run's last steps
        run.notes.append(
            f"steps {newer[0]['step']}-{newer[-1]['step']} are from {path.name} (after {state_path} was saved): "
            "only its keys are there"
        )
    run.source, run.records = state.source, state.records + newer
    run.findings += state.findings
    run.notes += state.notes
    return run


def _trainer_state(run_dir: Path, path: Path) -> RunLog:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunLogError(f"{path} is not valid JSON ({error}); a run killed while saving leaves that") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise RunLogError(f"{path} has no 'log_history' list; is it a Transformers trainer_state.json?")
    entries = [entry for entry in history if isinstance(entry, dict)]
    run = RunLog(str(path), "trl", [])
    return _collect(run, entries, lambda entry: entry.get("step"), training=lambda e: "loss" in e and "step" in e)


READERS: tuple[tuple[str, Callable[[Path, Path], RunLog]], ...] = (
    ("metrics.jsonl", _metrics_jsonl),
    ("logging.jsonl", _swift),
    ("trainer_log.jsonl", _llamafactory),
    ("trainer_state.json", _trainer_state),
)


def _collect(run: RunLog, entries: Iterable[dict[str, Any]], step_of, training) -> RunLog:
    """Training entries become records; findings are kept from every entry (an eval line can carry one too)."""
    for entry in entries:
        step = _as_step(step_of(entry))
        for finding in entry.get(FINDINGS_KEY) or ():
            run.findings.append(as_finding(finding, step))
        if step is not None and training(entry):
            run.records.append(normalised(entry, step))
    run.records.sort(key=lambda record: record["step"])
    return run


def _json_lines(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """Each JSON object line; a line that is not one (a run killed mid-write) becomes a note, not an error."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            notes.append(f"{path.name} line {number} is not a JSON object; left out")
    return entries


def _swift_step(entry: Mapping[str, Any]) -> Any:
    progress = entry.get("global_step/max_steps")
    if isinstance(progress, str) and "/" in progress:
        return progress.split("/", 1)[0].strip()
    return entry.get("step")


def normalised(entry: Mapping[str, Any], step: int) -> dict[str, Any]:
    """``{"step": step, <metric>: float, ...}``: numbers (non-finite spellings too) under the normalised names."""
    record: dict[str, Any] = {"step": step}
    for key, value in entry.items():
        if key in NOT_METRICS:
            continue
        if key == "events":
            if isinstance(value, list):
                record["events"] = [str(event) for event in value]
            continue
        number = _as_float(value)
        if number is not None:
            record.setdefault(RENAMED.get(key, key), number)  # a key already under its normalised name wins
    return record


def _as_float(value: Any) -> float | None:
    if isinstance(value, str):
        return NON_FINITE_SPELLINGS.get(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _as_step(value: Any) -> int | None:
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value.isdigit() else None
    number = _as_float(value)
    return int(number) if number is not None and math.isfinite(number) else None


def as_finding(value: Any, step: int | None = None) -> dict[str, Any]:
    """A finding as a dict with at least step, code, severity, message and fix.

    Takes what runs log (a dict, or a string as ``str(Finding)`` prints it) and what detectors
    return (:class:`~vlm_dpo_plugins.types.Finding` or any object with those attributes).
    """
    if isinstance(value, Mapping):
        record = dict(value)
    elif isinstance(value, str):
        record = _parsed_finding(value)
    else:
        record = {
            name: getattr(value, name)
            for name in (*FINDING_FIELDS, "step", "row", "field", "source")
            if hasattr(value, name)
        }
    if record.get("step") is None:
        record["step"] = step
    severity = record.get("severity")
    record["severity"] = str(getattr(severity, "value", severity) or "warning").lower()
    record["code"] = str(record.get("code") or "finding")
    record["message"] = str(record.get("message") or "")
    record["fix"] = str(record.get("fix") or "")
    record["step"] = _as_step(record["step"])
    return record


def _parsed_finding(text: str) -> dict[str, Any]:
    match = FINDING_LINE.match(text.strip())
    if match is None:
        return {"message": text}
    message, _, fix = match.group("rest").partition(" Fix: ")
    logged_step = re.search(r"\bstep (\d+)", match.group("where") or "")
    return {
        "step": int(logged_step.group(1)) if logged_step else None,
        "code": match.group("code"),
        "severity": match.group("severity"),
        "message": message,
        "fix": fix,
    }


def _unique(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Without repeats: ms-swift and LLaMA-Factory can carry the same finding on several log lines."""
    seen, unique = set(), []
    for finding in findings:
        key = (finding["code"], finding["step"], finding["message"])
        if key not in seen:
            seen.add(key)
            unique.append(finding)
    return unique


def _missing_notes(run: RunLog) -> list[str]:
    if not run.records:
        return [f"{Path(run.source).name} holds no training step (no line with a step and a loss)"]
    logged = {key for record in run.records for key in record}
    missing = [" or ".join(keys) for keys in EXPECTED_METRICS if not logged.intersection(keys)]
    return [MISSING_NOTE + ", ".join(missing)] if missing else []


def _guarded(read, path: Path):
    try:
        return read(path)
    except ValueError as error:  # the readers name the file and line; the CLI prints VLMDPOErrors without a trace
        raise RunLogError(str(error)) from None
