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
from dataclasses import dataclass
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.checkpointing import apply_ddp_plan
from vlm_dpo_plugins.adapters.swift.data_checks import checked_files
from vlm_dpo_plugins.adapters.swift.settings import reconcile, written_arguments

from vlm_dpo_plugins.collation.file_checks import CheckedFiles
from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.config_source import load_plugin_config
from vlm_dpo_plugins.guards.deepspeed import zero_stage
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import RunContext

CONFIG_VARIABLE = "VLM_DPO_CONFIG"
logger = logging.getLogger("vlm_dpo_plugins.adapters.swift")


@dataclass
class PluginRun:
    """What the plugin trainer of one swift DPO run is bound to."""

    plugins: Any
    config: VLMDPOConfig
    framework_computes_loss: bool
    context: RunContext
    origin: str
    training_args: Any
    checked_files: CheckedFiles | None = None


_pending: PluginRun | None = None


def prepare_run(args: Any) -> PluginRun:
    global _pending
    source = os.environ.get(CONFIG_VARIABLE) or None
    origin = f"{CONFIG_VARIABLE}={source}" if source else "defaults"
    plugins = create_plugin_manager()
    config, written = load_plugin_config(plugins, source)
    settings = reconcile(args, config, written, written_arguments(_command_line()))
    plugins.hook.vlm_dpo_configure(config=settings.config)
    for note in settings.notes:
        logger.info("vlm-dpo: %s", note)
    training_args = args.training_args
    context = run_context(args)
    _warn_about_unsynchronised_cpu_ranks(training_args)
    _plan_checkpointing(plugins, context, training_args)
    _pending = PluginRun(plugins, settings.config, settings.framework_computes_loss, context, origin, training_args)
    _pending.checked_files = _take_checked_files(plugins)
    return _pending


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
    run, _pending = _pending, None
    return run if run is not None and run.training_args is training_args else None


def _command_line() -> list[str]:
    ray_arguments = os.environ.get("RAY_SWIFT_ARGS")  # swift's own parser reads these instead of argv
    return json.loads(ray_arguments) if ray_arguments else sys.argv[1:]


def run_context(args: Any) -> RunContext:
    import swift

    training_args = args.training_args
    deepspeed_config = getattr(getattr(training_args, "hf_deepspeed_config", None), "config", None)
    return RunContext(
        framework="swift",
        framework_version=swift.__version__,
        world_size=training_args.world_size,
        rank=training_args.process_index,
        uses_peft=args.tuner_type != "full",
        uses_deepspeed=deepspeed_config is not None,
        deepspeed_stage=zero_stage(deepspeed_config) if deepspeed_config is not None else None,
        uses_fsdp=bool(training_args.fsdp),
        gradient_checkpointing=bool(training_args.gradient_checkpointing),
        mixed_precision="bf16" if training_args.bf16 else "fp16" if training_args.fp16 else None,
        output_dir=training_args.output_dir,
    )


def _plan_checkpointing(plugins: Any, context: RunContext, training_args: Any) -> None:
    """Swift forces its ``use_reentrant`` on every checkpoint call, read from ``gradient_checkpointing_kwargs``."""
    if context.gradient_checkpointing:
        kwargs = plugins.hook.vlm_dpo_gradient_checkpointing_kwargs(context=context) or {}
        if kwargs:
            training_args.gradient_checkpointing_kwargs = {
                **(training_args.gradient_checkpointing_kwargs or {}),
                **kwargs,
            }
    apply_ddp_plan(plugins, context, training_args)


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
