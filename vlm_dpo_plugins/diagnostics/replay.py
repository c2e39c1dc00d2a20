"""The metric-stream detectors run over a finished (or running) training log, e.g. for ``vlm-dpo report``.

Works on any framework's log, the stock trainers' included: only logged numbers are read,
so causes that need the live model (which groups were trainable, the batch) are named
as possibilities rather than facts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlm_dpo_plugins.diagnostics.plugin import Diagnostics
from vlm_dpo_plugins.diagnostics.settings import DiagnosticsConfig
from vlm_dpo_plugins.types import Finding


def replay_detectors(records: Sequence[Mapping[str, Any]], config: DiagnosticsConfig | None = None) -> list[Finding]:
    detectors = Diagnostics()
    detectors.set_up(config or DiagnosticsConfig())
    findings: list[Finding] = []
    for record in records:
        step = record.get("step")
        numbers = {key: float(value) for key, value in record.items() if _is_number(value) and key != "step"}
        findings += detectors.vlm_dpo_on_log(step=int(step) if step is not None else len(findings), metrics=numbers)
    return findings


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
