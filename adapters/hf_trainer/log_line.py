"""The plugins' metrics and findings on a framework's own log line, where its users look.

Two shapes of framework: one whose callbacks write the logged dict as it is (ms-swift's ``logging.jsonl``) gets
``FindingsOnLogLine`` first among its callbacks, so the step's findings are in that dict before it is written;
one whose callback writes a fixed set of keys from ``on_log`` (LLaMA-Factory's ``trainer_log.jsonl``) has that
callback's writer handed the line with the plugins' keys added (``extend_log_writer``).
"""

from __future__ import annotations

import functools
from typing import Any

from transformers import TrainerCallback

from vlm_dpo_plugins.runlog.sources import FINDINGS_KEY

PLUGIN_KEY_PREFIXES = ("vlm_dpo/", "collation/")


class FindingsOnLogLine(TrainerCallback):
    """The detectors run on each logged dict before the framework's own callbacks write it (inserted first)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            findings = self.trainer.run_detectors(logs)
            if findings:
                logs[FINDINGS_KEY] = [str(finding) for finding in findings]


def extend_log_writer(trainer: Any, callback_type: type, writer: str) -> None:
    """While a ``callback_type`` callback handles ``on_log``, its method ``writer(output_dir, logs)`` gets the line
    with the plugins' keys, the loss variant's terms and the findings since its last line added."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, callback_type) and "on_log" not in vars(callback):
            callback.on_log = functools.partial(_on_log_with_plugins, callback, trainer, writer)


def _on_log_with_plugins(
    callback: Any, trainer: Any, writer: str, args: Any, state: Any, control: Any, **kwargs: Any
) -> Any:
    last = state.log_history[-1] if state.log_history else {}
    extra = {
        key: value
        for key, value in last.items()
        if key.startswith(PLUGIN_KEY_PREFIXES) or key in trainer.vlm_dpo_loss_terms
    }
    findings = [str(f) for f in trainer.vlm_dpo_findings[getattr(callback, "_vlm_dpo_findings_logged", 0) :]]
    callback._vlm_dpo_findings_logged = len(trainer.vlm_dpo_findings)
    if findings:
        extra[FINDINGS_KEY] = findings
    if not extra:
        return type(callback).on_log(callback, args, state, control, **kwargs)
    stock_write = getattr(type(callback), writer)

    def write_with_plugins(output_dir: str, logs: dict[str, Any]) -> None:
        stock_write(callback, output_dir, {**logs, **extra})

    setattr(callback, writer, write_with_plugins)
    try:
        return type(callback).on_log(callback, args, state, control, **kwargs)
    finally:
        delattr(callback, writer)
