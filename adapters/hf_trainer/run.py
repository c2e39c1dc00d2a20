"""One plugin run: the plugins, the reconciled config, the run's facts, and the plans written before the model loads.

Every framework builds its model from its own arguments (LoRA targets, freeze flags, gradient checkpointing)
before its trainer exists, so what the plugins decide about those must be in the arguments first. An adapter
reconciles its settings (``settings.py``), then calls ``start_run``: the plugins see the agreed config, and the
checkpointing and DDP plan is handed back for the adapter to write where its framework reads it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.preference_step import loss_inputs
from vlm_dpo_plugins.adapters.hf_trainer.settings import Reconciled

from vlm_dpo_plugins.collation.file_checks import CheckedFiles
from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.config_source import load_plugin_config
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.guards.deepspeed import zero_stage
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import RunContext

logger = logging.getLogger("vlm_dpo_plugins.adapters")
CONFIG_VARIABLE = "VLM_DPO_CONFIG"
"""The plugin settings' YAML for a framework whose own config has no place for them (or a run that keeps them apart)."""


@dataclass
class PluginRun:
    """What the plugin trainer of one framework run is bound to."""

    plugins: Any
    config: VLMDPOConfig
    framework_computes_loss: bool
    context: RunContext
    origin: str
    """Where the plugin settings came from, for the start line ("defaults", "VLM_DPO_CONFIG=...")."""
    checked_files: CheckedFiles | None = None
    """The training files the adapter checked before its framework read them (LLaMA-Factory, ms-swift)."""
    checkpointing_kwargs: dict[str, Any] = field(default_factory=dict)
    """The ``gradient_checkpointing_kwargs`` the guards chose (empty without gradient checkpointing)."""


@dataclass
class RunSettings:
    """A run's plugins and the plugin config they loaded, before the framework's arguments are reconciled with it."""

    plugins: Any
    config: VLMDPOConfig
    written: dict[str, set[str]]
    """The keys the plugin config wrote, by section: a written value, unlike a default, can conflict."""
    origin: str

    @classmethod
    def load(cls, source: Any, origin: str) -> RunSettings:
        plugins = create_plugin_manager()
        config, written = load_plugin_config(plugins, source)
        return cls(plugins, config, written, origin)

    def reads_reference(self, loss_type: str) -> bool:
        """Whether the loss variant reads reference log-probs (so the framework must build or keep a reference)."""
        return loss_inputs(self.plugins, loss_type).reference

    def start(
        self, reconciled: Reconciled, training_args: Any, framework: str, version: str, **facts: bool
    ) -> PluginRun:
        """``start_run`` with the run's facts read from ``training_args`` (``facts``: ``run_context``'s keywords)."""
        context = run_context(framework, version, training_args, **facts)
        return start_run(self.plugins, reconciled, context, self.origin, training_args)


def settings_source(section: Any = None, section_origin: str = "") -> tuple[Any, str]:
    """Where a run's plugin settings come from, and how the start line names it: the framework config's own
    section (a mapping or a YAML path), else the YAML named by ``VLM_DPO_CONFIG``, else the defaults; both given
    is an error."""
    if section is not None and not isinstance(section, (Mapping, str, os.PathLike)):
        raise ConfigError(
            f"{section_origin} is {section!r}: expected a mapping of plugin settings (freeze, loss, guards, ...) "
            "or the path of a YAML file with them"
        )
    from_environment = os.environ.get(CONFIG_VARIABLE) or None
    if section is not None and from_environment:
        raise ConfigError(
            f"the plugin settings are given twice ({section_origin}, and {CONFIG_VARIABLE}={from_environment}): "
            "give them in one place"
        )
    if section is not None:
        return section, section_origin
    if from_environment:
        return from_environment, f"{CONFIG_VARIABLE}={from_environment}"
    return None, "defaults"


def command_line_keys(argv: Iterable[Any]) -> frozenset[str]:
    """The argument names present on a command line (``--name value``, ``--name=value``, ``--name-with-dashes``):
    what the user wrote there, as opposed to the parser's defaults."""
    return frozenset(
        str(token)[2:].split("=", 1)[0].replace("-", "_")
        for token in argv
        if str(token).startswith("--") and len(str(token)) > 2
    )


def fsdp_version(training_args: Any) -> int | None:
    """The FSDP version accelerate is asked for, None without FSDP. Read from what ``TrainingArguments`` resolved:
    its default differs across transformers releases (1 in 5.6, 2 in 5.19)."""
    if not training_args.fsdp:
        return None
    return int((getattr(training_args, "fsdp_plugin_args", None) or {}).get("fsdp_version", 1))


def run_context(
    framework: str, version: str, training_args: Any, *, uses_peft: bool, gradient_checkpointing: bool
) -> RunContext:
    """The run's facts from a ``TrainingArguments`` (every framework here subclasses it)."""
    deepspeed_config = getattr(getattr(training_args, "hf_deepspeed_config", None), "config", None)
    return RunContext(
        framework=framework,
        framework_version=version,
        world_size=training_args.world_size,
        rank=training_args.process_index,
        uses_peft=uses_peft,
        uses_deepspeed=deepspeed_config is not None,
        deepspeed_stage=zero_stage(deepspeed_config) if deepspeed_config is not None else None,
        uses_fsdp=bool(training_args.fsdp),
        fsdp_version=fsdp_version(training_args),
        gradient_checkpointing=gradient_checkpointing,
        mixed_precision="bf16" if training_args.bf16 else "fp16" if training_args.fp16 else None,
        output_dir=training_args.output_dir,
    )


def start_run(
    plugins: Any, reconciled: Reconciled, context: RunContext, origin: str, training_args: Any
) -> PluginRun:
    """The plugins configured with the agreed settings (the notes about them logged once), and their checkpointing
    and DDP plan written into ``training_args`` before the framework builds the model and wraps it.

    The checkpointing kwargs are also kept on the run, for a framework that reads its own key instead
    (LLaMA-Factory's ``use_reentrant_gc``).
    """
    plugins.hook.vlm_dpo_configure(config=reconciled.config)
    for note in reconciled.notes:
        logger.info("vlm-dpo: %s", note)
    if reconciled.framework_keys:
        origin = f"{origin}, with {reconciled.framework_keys}"
    run = PluginRun(plugins, reconciled.config, reconciled.framework_computes_loss, context, origin)
    if context.gradient_checkpointing:
        run.checkpointing_kwargs = plugins.hook.vlm_dpo_gradient_checkpointing_kwargs(context=context) or {}
    if run.checkpointing_kwargs:
        current = training_args.gradient_checkpointing_kwargs or {}
        training_args.gradient_checkpointing_kwargs = {**current, **run.checkpointing_kwargs}
    apply_ddp_plan(plugins, context, training_args)
    return run


def apply_ddp_plan(plugins: Any, context: RunContext, training_args: Any) -> None:
    """``static_graph``/``find_unused_parameters`` that cannot raise "Expected to mark a variable ready only once".

    Written into ``TrainingArguments`` before the Trainer wraps the model in DDP.
    """
    if not context.gradient_checkpointing:
        return
    ddp = plugins.hook.vlm_dpo_ddp_kwargs(context=context) or {}
    if "static_graph" in ddp:
        training_args.ddp_static_graph = ddp["static_graph"]
    if "find_unused_parameters" in ddp:
        if training_args.ddp_find_unused_parameters not in (None, ddp["find_unused_parameters"]):
            logger.warning(
                "vlm-dpo: ddp_find_unused_parameters=%s changed to %s: with reentrant checkpointing under DDP it "
                "raises 'Expected to mark a variable ready only once'",
                training_args.ddp_find_unused_parameters,
                ddp["find_unused_parameters"],
            )
        training_args.ddp_find_unused_parameters = ddp["find_unused_parameters"]
