"""One swift DPO run with the plugins: settings reconciled before swift prepares the model.

``prepare_run(args)`` runs right before ``SwiftRLHF.prepare_model`` (LoRA, full-tuning
freeze): the plugin config (``VLM_DPO_CONFIG``) is reconciled with swift's arguments
(``settings.py``), the checkpointing/DDP plan written into the training arguments swift's
trainer reads, and the run kept for the trainer that swift builds next from
``TRAINER_MAPPING['dpo']``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.run import (
    PluginRun,
    apply_ddp_plan,
    checkpointing_kwargs,
    run_context,
    start_run,
)
from vlm_dpo_plugins.adapters.swift.data_checks import checked_files
from vlm_dpo_plugins.adapters.swift.settings import reconcile, written_arguments

from vlm_dpo_plugins.collation.file_checks import CheckedFiles
from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.config_source import load_plugin_config
from vlm_dpo_plugins.manager import create_plugin_manager

CONFIG_VARIABLE = "VLM_DPO_CONFIG"
logger = logging.getLogger("vlm_dpo_plugins.adapters.swift")

_pending: tuple[PluginRun, Any] | None = None
"""The run prepared last, with the training arguments it was prepared for."""


def prepare_run(args: Any) -> PluginRun:
    global _pending
    import swift

    source = os.environ.get(CONFIG_VARIABLE) or None
    plugins = create_plugin_manager()
    config, written = load_plugin_config(plugins, source)
    reconciled = reconcile(args, config, written, written_arguments(_command_line()))
    training_args = args.training_args
    context = run_context(
        "swift",
        swift.__version__,
        training_args,
        uses_peft=args.tuner_type != "full",
        gradient_checkpointing=bool(training_args.gradient_checkpointing),
    )
    run = start_run(plugins, reconciled, context, f"{CONFIG_VARIABLE}={source}" if source else "defaults")
    _warn_about_unsynchronised_cpu_ranks(training_args)
    # Swift forces its ``use_reentrant`` on every checkpoint call, read from ``gradient_checkpointing_kwargs``.
    planned = checkpointing_kwargs(plugins, context)
    if planned:
        training_args.gradient_checkpointing_kwargs = {**(training_args.gradient_checkpointing_kwargs or {}), **planned}
    apply_ddp_plan(plugins, context, training_args)
    run.checked_files = _take_checked_files(plugins)
    _pending = (run, training_args)
    return run


def plugin_config() -> VLMDPOConfig:
    """The plugin config as ``VLM_DPO_CONFIG`` names it, for the steps before swift prepares the model."""
    return load_plugin_config(create_plugin_manager(), os.environ.get(CONFIG_VARIABLE) or None)[0]


def _take_checked_files(plugins: Any) -> CheckedFiles | None:
    checked = checked_files()
    collation = plugins.get_plugin("collation")
    if checked is None or collation is None:
        return None
    files, report = checked
    collation.report.started |= report.started  # the run's report goes on after the file checks' lines
    return files


def take_run(training_args: Any) -> PluginRun | None:
    """The run prepared for these training arguments (once), or None when swift's pipeline did not prepare one."""
    global _pending
    pending, _pending = _pending, None
    return pending[0] if pending is not None and pending[1] is training_args else None


def _command_line() -> list[str]:
    ray_arguments = os.environ.get("RAY_SWIFT_ARGS")  # swift's own parser reads these instead of argv
    return json.loads(ray_arguments) if ray_arguments else sys.argv[1:]


def _warn_about_unsynchronised_cpu_ranks(training_args: Any) -> None:
    import torch

    processes = int(os.environ.get("NPROC_PER_NODE") or 1)
    if processes > 1 and not torch.cuda.is_available() and not training_args.use_cpu:
        logger.warning(
            "vlm-dpo: NPROC_PER_NODE=%d on a machine without a GPU and without --use_cpu true: swift starts %d "
            "independent copies of the run whose gradients are never averaged (each rank trains alone). Add "
            "--use_cpu true for DDP over gloo",
            processes,
            processes,
        )
