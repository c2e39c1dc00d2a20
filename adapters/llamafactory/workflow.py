"""LLaMA-Factory's ``run_dpo`` with the plugins: settings first, then LLaMA-Factory's own workflow.

Before the stock workflow runs (and so before ``load_model`` reads its arguments): the
plugin config is reconciled with LLaMA-Factory's arguments (``settings.py``), the
checkpointing/DDP plan written into them. While it runs, ``CustomDPOTrainer`` in
LLaMA-Factory's trainer module is the plugin subclass, bound to this run; the stock
workflow imports it from there by name. Everything else (tokenizer, template, dataset,
model, collator, reference model, saving, plots) is LLaMA-Factory's.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.checkpointing import apply_ddp_plan
from vlm_dpo_plugins.adapters.llamafactory.config_section import ParsedSection, latest
from vlm_dpo_plugins.adapters.llamafactory.data_checks import FRAMEWORK, checked_loading
from vlm_dpo_plugins.adapters.llamafactory.settings import reconcile

from vlm_dpo_plugins.collation.file_checks import CheckedFiles
from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.config_source import load_plugin_config
from vlm_dpo_plugins.guards.deepspeed import zero_stage
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import LossInputs, RunContext

logger = logging.getLogger("vlm_dpo_plugins.adapters.llamafactory")


@dataclass
class PluginRun:
    """What the plugin trainer of one ``run_dpo`` call is bound to."""

    plugins: Any
    config: VLMDPOConfig
    framework_computes_loss: bool
    context: RunContext
    origin: str
    data: CheckedFiles = field(default_factory=lambda: CheckedFiles(FRAMEWORK))


def plugin_run_dpo(stock_run_dpo: Any) -> Any:
    @functools.wraps(stock_run_dpo)
    def run_dpo(model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any, callbacks: Any = None):
        if getattr(finetuning_args, "use_mca", False):
            logger.warning("vlm-dpo: use_mca trains with Megatron-Core, which the adapter does not hook; it stays off")
            return stock_run_dpo(model_args, data_args, training_args, finetuning_args, callbacks)
        run = prepare_run(latest(), model_args, training_args, finetuning_args)
        from llamafactory.train.dpo import trainer as trainer_module
        from vlm_dpo_plugins.adapters.llamafactory.trainer import PluginDPOTrainer

        stock_trainer = trainer_module.CustomDPOTrainer
        trainer_module.CustomDPOTrainer = functools.partial(PluginDPOTrainer, vlm_dpo_run=run)
        collation = run.plugins.get_plugin("collation")
        try:
            if collation is None:  # blocked: no checks at all
                return stock_run_dpo(model_args, data_args, training_args, finetuning_args, callbacks)
            with checked_loading(run.config.collation, data_args, training_args, collation.report) as run.data:
                return stock_run_dpo(model_args, data_args, training_args, finetuning_args, callbacks)
        finally:
            trainer_module.CustomDPOTrainer = stock_trainer

    return run_dpo


def prepare_run(section: ParsedSection, model_args: Any, training_args: Any, finetuning_args: Any) -> PluginRun:
    plugins = create_plugin_manager()
    config, written = load_plugin_config(plugins, section.source)

    def reads_reference(loss_type: str) -> bool:
        return (plugins.hook.vlm_dpo_loss_inputs(loss_type=loss_type) or LossInputs()).reference

    settings = reconcile(
        model_args,
        training_args,
        finetuning_args,
        config,
        written,
        section.written,
        reads_reference=reads_reference,
    )
    plugins.hook.vlm_dpo_configure(config=settings.config)
    for note in settings.notes:
        logger.info("vlm-dpo: %s", note)
    context = run_context(model_args, training_args, finetuning_args)
    _plan_checkpointing(plugins, context, model_args, training_args)
    return PluginRun(plugins, settings.config, settings.framework_computes_loss, context, section.origin)


def run_context(model_args: Any, training_args: Any, finetuning_args: Any) -> RunContext:
    import llamafactory

    deepspeed_config = getattr(getattr(training_args, "hf_deepspeed_config", None), "config", None)
    return RunContext(
        framework="llamafactory",
        framework_version=llamafactory.__version__,
        world_size=training_args.world_size,
        rank=training_args.process_index,
        uses_peft=finetuning_args.finetuning_type in ("lora", "oft"),
        uses_deepspeed=deepspeed_config is not None,
        deepspeed_stage=zero_stage(deepspeed_config) if deepspeed_config is not None else None,
        uses_fsdp=bool(training_args.fsdp),
        gradient_checkpointing=not model_args.disable_gradient_checkpointing,
        mixed_precision="bf16" if training_args.bf16 else "fp16" if training_args.fp16 else None,
        output_dir=training_args.output_dir,
    )


def _plan_checkpointing(plugins: Any, context: RunContext, model_args: Any, training_args: Any) -> None:
    """LLaMA-Factory enables checkpointing itself in ``load_model``, reentrant unless told otherwise."""
    if not context.gradient_checkpointing:
        return
    kwargs = plugins.hook.vlm_dpo_gradient_checkpointing_kwargs(context=context) or {}
    if "use_reentrant" in kwargs:
        model_args.use_reentrant_gc = bool(kwargs["use_reentrant"])
    apply_ddp_plan(plugins, context, training_args)
