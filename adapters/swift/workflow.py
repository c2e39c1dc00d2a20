"""One swift DPO run with the plugins: one plugin manager from the data checks to the trainer.

Swift reads its ``--dataset`` files first (checked with this run's plugins); ``prepare_run`` runs right before
``SwiftRLHF.prepare_model``, and the trainer swift builds next (by name, from ``TRAINER_MAPPING``, so nothing can
be passed to it) takes the run with ``take_run``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.run import PluginRun, RunSettings, command_line_keys, settings_source
from vlm_dpo_plugins.adapters.swift.settings import agree, reconcile

from vlm_dpo_plugins.collation.file_checks import CheckedFiles

logger = logging.getLogger("vlm_dpo_plugins.adapters.swift")


@dataclass
class SwiftRun:
    """One swift run's plugins, keyed by swift's arguments object, from the data checks to the trainer."""

    args: Any
    settings: RunSettings
    checked_files: CheckedFiles | None = None
    prepared: tuple[PluginRun, Any] | None = None
    """The run ``prepare_run`` made last, with the training arguments it was made for."""


_current: SwiftRun | None = None


def current_run(args: Any) -> SwiftRun:
    """This swift run's plugins and config, made on first use (the data checks, or ``prepare_run``)."""
    global _current
    if _current is None or _current.args is not args:
        _current = SwiftRun(args, RunSettings.load(*settings_source()))
    return _current


def check_settings(args: Any) -> SwiftRun:
    """This run's plugins, with swift's flags and the plugin config checked to agree before any data is read."""
    current = current_run(args)
    agree(args, current.settings.config, current.settings.written, command_line_keys(_command_line()))
    return current


def prepare_run(args: Any) -> PluginRun:
    import swift

    current = current_run(args)
    settings, training_args = current.settings, args.training_args
    reconciled = reconcile(args, settings.config, settings.written, command_line_keys(_command_line()))
    # Swift forces its ``use_reentrant`` on every checkpoint call, read from ``gradient_checkpointing_kwargs``.
    run = settings.start(
        reconciled,
        training_args,
        "swift",
        swift.__version__,
        uses_peft=args.tuner_type != "full",
        gradient_checkpointing=bool(training_args.gradient_checkpointing),
    )
    _warn_about_unsynchronised_cpu_ranks(training_args)
    run.checked_files = current.checked_files
    current.prepared = (run, training_args)
    return run


def take_run(training_args: Any) -> PluginRun | None:
    """The run prepared for these training arguments (once), or None when swift's pipeline did not prepare one."""
    if _current is None or _current.prepared is None or _current.prepared[1] is not training_args:
        return None
    run, _current.prepared = _current.prepared[0], None
    return run


def _command_line() -> list[str]:
    ray_arguments = os.environ.get("RAY_SWIFT_ARGS")  # swift's own parser reads these instead of argv
    return json.loads(ray_arguments) if ray_arguments else sys.argv[1:]


def _warn_about_unsynchronised_cpu_ranks(training_args: Any) -> None:
    import torch

    processes = int(os.environ.get("NPROC_PER_NODE") or 1)
    if processes > 1 and not torch.cuda.is_available() and not training_args.use_cpu:
        logger.warning(
            "vlm-dpo: NPROC_PER_NODE=%d on a machine without a GPU and without --use_cpu true: swift starts %d "
            "independent copies of the run whose gradients are never averaged (each rank trains alone; under "
            "--deepspeed, DeepSpeed's batch check stops them instead). Add --use_cpu true for DDP over gloo; ZeRO-3 "
            "and FSDP2 on CPU ranks: docs/scaling.md",
            processes,
            processes,
        )
