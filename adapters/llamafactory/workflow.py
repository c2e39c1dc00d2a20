"""LLaMA-Factory's ``run_dpo`` with the plugins: settings first, then LLaMA-Factory's own workflow.

The plugin config is reconciled and the checkpointing/DDP plan written before ``load_model`` reads the arguments;
while the stock workflow runs, the trainer it imports by name is the plugin subclass bound to this run.
"""

from __future__ import annotations

import functools
import logging
from contextlib import nullcontext
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.activation import patched
from vlm_dpo_plugins.adapters.hf_trainer.config_section import ParsedSection
from vlm_dpo_plugins.adapters.hf_trainer.run import PluginRun, RunSettings
from vlm_dpo_plugins.adapters.llamafactory.config_section import SECTION
from vlm_dpo_plugins.adapters.llamafactory.data_checks import checked_loading
from vlm_dpo_plugins.adapters.llamafactory.settings import reconcile

from vlm_dpo_plugins.collation.wrapper import collation_report

logger = logging.getLogger("vlm_dpo_plugins.adapters.llamafactory")


def plugin_run_dpo(stock_run_dpo: Any) -> Any:
    @functools.wraps(stock_run_dpo)
    def run_dpo(model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any, callbacks: Any = None):
        if getattr(finetuning_args, "use_mca", False):
            logger.warning("vlm-dpo: use_mca trains with Megatron-Core, which the adapter does not hook; it stays off")
            return stock_run_dpo(model_args, data_args, training_args, finetuning_args, callbacks)
        run = prepare_run(SECTION.latest, model_args, training_args, finetuning_args)
        from llamafactory.train.dpo import trainer as trainer_module
        from vlm_dpo_plugins.adapters.llamafactory.trainer import PluginDPOTrainer

        report = collation_report(run.plugins)
        # With the collation checks blocked, the files are read as LLaMA-Factory alone reads them.
        loading = nullcontext()
        if report is not None:
            loading = checked_loading(run.config.collation, data_args, training_args, report)
        plugin_trainer = functools.partial(PluginDPOTrainer, vlm_dpo_run=run)
        with patched(trainer_module, CustomDPOTrainer=plugin_trainer), loading as run.checked_files:
            return stock_run_dpo(model_args, data_args, training_args, finetuning_args, callbacks)

    return run_dpo


def prepare_run(section: ParsedSection, model_args: Any, training_args: Any, finetuning_args: Any) -> PluginRun:
    import llamafactory

    settings = RunSettings.load(section.source, section.origin)
    reconciled = reconcile(model_args, training_args, finetuning_args, settings, section.written)
    run = settings.start(
        reconciled,
        training_args,
        "llamafactory",
        llamafactory.__version__,
        uses_peft=finetuning_args.finetuning_type in ("lora", "oft"),
        gradient_checkpointing=not model_args.disable_gradient_checkpointing,
    )
    # LLaMA-Factory enables checkpointing itself in ``load_model``, reentrant unless told otherwise.
    if "use_reentrant" in run.checkpointing_kwargs:
        model_args.use_reentrant_gc = bool(run.checkpointing_kwargs["use_reentrant"])
    return run
