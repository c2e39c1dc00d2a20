"""The metrics file of a run: one JSON object per logged step, readable while the run is still going.

Each line is ``{"step": N, <metric>: <value>, ..., "events": [...]}``. The file stays
standard JSON (any JSON reader, ``jq`` or pandas can read it), so the non-finite
floats a diverging run produces are written as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"``; :func:`read_metrics` turns them back into floats.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

NON_FINITE_SPELLINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
RESERVED_KEYS = ("step", "events")


class MetricsLog:
    """Appends one record per logged step to a JSONL file.

    Every ``append`` opens, writes one whole line and closes the file, so a run
    killed at any moment keeps every earlier line, and a reader (a plot, ``tail -f``)
    sees complete records only. An existing file is appended to, not replaced.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, step: int, metrics: Mapping[str, float], events: Sequence[str] = ()) -> None:
        """Write ``{"step": step, **metrics, "events": [...]}``; ``step`` and ``events`` win over same-named metrics."""
        record: dict[str, Any] = {"step": int(step)}
        record.update({key: encode_value(value) for key, value in metrics.items() if key not in RESERVED_KEYS})
        record["events"] = [str(event) for event in events]
        line = json.dumps(record, allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(line + "\n")
            file.flush()


def encode_value(value: Any) -> Any:
    """A JSON-safe value: non-finite floats spelled as strings, numpy/torch scalars as plain floats."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if not isinstance(value, float):
        value = float(value)  # numpy float32 and 0-d tensors are not JSON-serialisable as they are
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def decode_record(record: dict[str, Any]) -> dict[str, Any]:
    return {
        key: NON_FINITE_SPELLINGS[value] if isinstance(value, str) and value in NON_FINITE_SPELLINGS else value
        for key, value in record.items()
    }


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file, non-finite values as floats again.

    A last line without its newline is what a killed run leaves mid-write; it is
    ignored if it does not parse. Any other line that is not a JSON object with a
    ``step`` raises ``ValueError`` naming the file and the line number.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    unterminated_last = lines[-1] != ""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        is_cut_off = unterminated_last and number == len(lines)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if is_cut_off:
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}: line {number} is not a metrics record (expected a JSON object with a 'step')")
        records.append(decode_record(record))
    return records
