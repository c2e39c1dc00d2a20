"""The plugins' metrics and findings on LLaMA-Factory's own ``trainer_log.jsonl`` line, where a user looks.

Its ``LogCallback`` writes a fixed set of keys from a background thread; while it handles ``on_log`` its
``_write_log`` gets the line with the plugins' keys and the step's findings added.
"""

from __future__ import annotations

import functools
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.plugin_trainer import FINDINGS_KEY

PLUGIN_KEY_PREFIXES = ("vlm_dpo/", "collation/", "mdpo/", "mpo/", "rpo/", "ipo/")  # the built-in loss terms


def extend_trainer_log(trainer: Any) -> None:
    from llamafactory.train.callbacks import LogCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, LogCallback) and "on_log" not in vars(callback):
            callback.on_log = functools.partial(_on_log_with_plugins, callback, trainer)


def _on_log_with_plugins(callback: Any, trainer: Any, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
    last = state.log_history[-1] if state.log_history else {}
    extra = {key: value for key, value in last.items() if key.startswith(PLUGIN_KEY_PREFIXES)}
    findings = [str(f) for f in trainer.vlm_dpo_findings[getattr(callback, "_vlm_dpo_findings_logged", 0) :]]
    callback._vlm_dpo_findings_logged = len(trainer.vlm_dpo_findings)
    if findings:
        extra[FINDINGS_KEY] = findings
    if not extra:
        return type(callback).on_log(callback, args, state, control, **kwargs)
    stock_write = type(callback)._write_log

    def write_with_plugins(output_dir: str, logs: dict[str, Any]) -> None:
        stock_write(callback, output_dir, {**logs, **extra})

    callback._write_log = write_with_plugins
    try:
        return type(callback).on_log(callback, args, state, control, **kwargs)
    finally:
        del callback._write_log
