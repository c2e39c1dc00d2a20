"""A Trainer callback that keeps every training log as a run-log record, and the per-step table people read.

Used by ``vlm-dpo train`` and the scenarios; works on stock ``trl.DPOTrainer`` as well,
so a comparison records both runs the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from vlm_dpo_plugins.runlog.metrics import MetricsLog

TABLE_COLUMNS = (
    ("step", "step", 5),
    ("loss", "loss", 8),
    ("margin", "rewards/margins", 8),
    ("accuracy", "rewards/accuracies", 8),
    ("grad_norm", "grad_norm", 9),
    ("skipped", "vlm_dpo/skipped_steps", 7),
)


def table_header() -> str:
    return "  ".join(f"{title:>{width}}" for title, _, width in TABLE_COLUMNS)


def table_row(record: dict[str, Any]) -> str:
    return "  ".join(_cell(record.get(key), width) for _, key, width in TABLE_COLUMNS)


def _cell(value: Any, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e6 and width <= 7:
        return f"{int(value):>{width}}"
    if isinstance(value, float):
        return f"{value:>{width}.4f}" if math.isfinite(value) else f"{value!s:>{width}}"
    return f"{value!s:>{width}}"


class StepRecorder(TrainerCallback):
    """Collects each training log (those with a ``loss``) as ``{"step": ..., **metrics}``.

    ``metrics_path``: also append each record to this ``metrics.jsonl``; ``on_record``:
    called with each record (the CLI prints a table row there); ``events``: returns the
    event strings for a step (e.g. ``"skipped: non-finite gradient norm"``).
    """

    def __init__(
        self,
        metrics_path: str | Path | None = None,
        on_record: Callable[[dict[str, Any]], None] | None = None,
        events: Callable[[int], list[str]] | None = None,
    ) -> None:
        self.records: list[dict[str, Any]] = []
        self.log = MetricsLog(metrics_path) if metrics_path is not None else None
        self.on_record = on_record
        self.events = events

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        metrics = {key: float(value) for key, value in logs.items() if isinstance(value, (int, float))}
        events = self.events(state.global_step) if self.events is not None else []
        record = {"step": state.global_step, **metrics, "events": events}
        self.records.append(record)
        if self.log is not None:
            self.log.append(state.global_step, metrics, events)
        if self.on_record is not None:
            self.on_record(record)


class ProgressBar(TrainerCallback):
    """A tqdm bar over the optimizer steps; table rows are written above it instead of breaking it."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def write(self, text: str, out: Any) -> None:
        if self.bar is None:
            print(text, file=out, flush=True)
        else:
            self.bar.write(text, file=out)
