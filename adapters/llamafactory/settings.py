"""What LLaMA-Factory's arguments and the ``vlm_dpo:`` section can both say, as one table (docs/llamafactory.md).

LLaMA-Factory's keys keep meaning what they meant; after reconciling they are rewritten before ``load_model``
reads them. Loss types and options only LLaMA-Factory has leave the loss to it; its ``hinge``/``ipo`` bug is
fixed there too (``trainer.dpo_loss``).
"""

from __future__ import annotations

from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.run import RunSettings
from vlm_dpo_plugins.adapters.hf_trainer.settings import (
    FrameworkLoss,
    FrameworkSettings,
    KeyNames,
    Reconciled,
    SharedSetting,
    positive_or_none,
)

# Same name and formula in LLaMA-Factory 0.9.5 and in the built-in registry (tests compare the values).
SHARED_LOSS_TYPES = frozenset({"sigmoid", "hinge", "ipo", "simpo"})
FRAMEWORK_ONLY_LOSS_TYPES = frozenset({"orpo", "kto_pair"})


@dataclass(frozen=True)
class Arguments:
    """LLaMA-Factory's parsed argument objects, as one thing the settings table reads."""

    model: Any
    training: Any
    finetuning: Any


LLAMAFACTORY = FrameworkSettings(
    "LLaMA-Factory",
    "LLaMA-Factory's arguments",
    KeyNames(framework="LLaMA-Factory's {key}", plugin="vlm_dpo.{key}"),
    table=(
        SharedSetting("loss.beta", "pref_beta", read=lambda args: args.finetuning.pref_beta),
        SharedSetting("loss.label_smoothing", "dpo_label_smoothing", read=lambda a: a.finetuning.dpo_label_smoothing),
        SharedSetting(
            "loss.simpo_gamma", "simpo_gamma", read=lambda args: args.finetuning.simpo_gamma, only_for_loss="simpo"
        ),
        SharedSetting(
            "guards.max_grad_norm",
            "max_grad_norm",
            read=lambda args: args.training.max_grad_norm,
            to_plugin=positive_or_none,
        ),
        SharedSetting(
            "guards.non_reentrant_checkpointing",
            "use_reentrant_gc",
            read=lambda args: bool(args.model.use_reentrant_gc),
            to_plugin=lambda reentrant: not reentrant,
        ),
    ),
    freeze_flags={
        "vision": "freeze_vision_tower",
        "projector": "freeze_multi_modal_projector",
        "language": "freeze_language_model",
    },
    loss_only=("loss.label_smoothing", "loss.simpo_gamma"),
)


def reconcile(
    model_args: Any, training_args: Any, finetuning_args: Any, settings: RunSettings, framework_written: Set[str]
) -> Reconciled:
    """Merge LLaMA-Factory's parsed arguments (changed in place) and the plugin config (replaced) into one set."""
    pref_loss = finetuning_args.pref_loss
    # An unwritten pref_loss is LLaMA-Factory's default, sigmoid: the registry's default too.
    loss = FrameworkLoss(
        "pref_loss",
        pref_loss,
        "pref_loss" in framework_written,
        plugin_type=None if pref_loss in FRAMEWORK_ONLY_LOSS_TYPES else pref_loss,
        own_options=_framework_only_options(finetuning_args),
    )
    arguments = Arguments(model_args, training_args, finetuning_args)
    reconciled = LLAMAFACTORY.reconcile(
        arguments, settings.config, settings.written, framework_written, loss, flags_on=finetuning_args
    )
    _write_back(reconciled, arguments, settings.reads_reference)
    return reconciled


def _framework_only_options(finetuning_args: Any) -> list[str]:
    options = []
    if finetuning_args.pref_bco_weight > 1e-6:
        options.append(f"pref_bco_weight={finetuning_args.pref_bco_weight}")
    if finetuning_args.ld_alpha is not None:
        options.append(f"ld_alpha={finetuning_args.ld_alpha}")
    return options


def _write_back(settings: Reconciled, arguments: Arguments, reads_reference: Callable[[str], bool]) -> None:
    """LLaMA-Factory's arguments as the plugin config says, before ``load_model`` and the trainer read them."""
    config, finetuning_args, training = settings.config, arguments.finetuning, arguments.training
    LLAMAFACTORY.write_back(config, finetuning_args, training, uses_deepspeed=bool(training.deepspeed))
    if not settings.framework_computes_loss:
        finetuning_args.pref_beta = config.loss.beta
        if config.loss.type in SHARED_LOSS_TYPES:
            finetuning_args.pref_loss = config.loss.type
        # A reference model is built (full tuning) or the adapter disabled (LoRA) only when the variant reads it.
        finetuning_args.use_ref_model = reads_reference(config.loss.type)
        finetuning_args.dpo_label_smoothing = config.loss.label_smoothing if config.loss.type == "sigmoid" else 0.0
    if config.section("guards") is not None:
        arguments.model.use_reentrant_gc = not config.guards.non_reentrant_checkpointing
