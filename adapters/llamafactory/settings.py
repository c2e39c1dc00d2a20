"""One source of truth for what LLaMA-Factory's arguments and the ``vlm_dpo:`` section can both say.

LLaMA-Factory's own keys keep meaning what they meant: ``pref_loss``, ``pref_beta``,
``dpo_label_smoothing``, ``simpo_gamma``, ``max_grad_norm``, ``use_reentrant_gc`` and the
three freeze flags. A value written in only one place is used by both; a value written
differently in both is an error naming both keys. "Written" means present in the user's
YAML (or CLI overrides), not LLaMA-Factory's default.

After reconciling, LLaMA-Factory's arguments are rewritten to agree with the plugin config
before ``load_model`` reads them: its freeze flags mark trainable every group the policy
ever trains (so LoRA targets and full-tuning ``requires_grad`` cover the unfreeze stages;
the policy freezes the later ones at step 0), ``use_reentrant_gc`` follows the
checkpointing guard, and ``max_grad_norm`` is 0 outside DeepSpeed because the guards clip.

Loss types and options only LLaMA-Factory has (``orpo``, ``kto_pair``, ``pref_bco_weight``,
``ld_alpha``) leave the loss to LLaMA-Factory; its ``hinge``/``ipo`` bug is fixed there too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.settings import (
    FrameworkLoss,
    KeyNames,
    Reconciled,
    SharedSetting,
    choose_loss,
    framework_max_grad_norm,
    frozen_flags,
    positive_or_none,
    reconcile_freeze_flags,
    reconcile_shared,
    with_values,
)

from vlm_dpo_plugins.config import VLMDPOConfig

# Same name and formula in LLaMA-Factory 0.9.5 and in the built-in registry (tests compare the values).
SHARED_LOSS_TYPES = frozenset({"sigmoid", "hinge", "ipo", "simpo"})
FRAMEWORK_ONLY_LOSS_TYPES = frozenset({"orpo", "kto_pair"})
FREEZE_FLAGS = {
    "vision": "freeze_vision_tower",
    "projector": "freeze_multi_modal_projector",
    "language": "freeze_language_model",
}
KEY_NAMES = KeyNames(framework="LLaMA-Factory's {key}", plugin="vlm_dpo.{key}")


@dataclass(frozen=True)
class Arguments:
    """LLaMA-Factory's parsed argument objects, as one thing the settings table reads."""

    model: Any
    training: Any
    finetuning: Any


SHARED_SETTINGS = (
    SharedSetting("loss.beta", "pref_beta", read=lambda args: args.finetuning.pref_beta),
    SharedSetting("loss.label_smoothing", "dpo_label_smoothing", read=lambda args: args.finetuning.dpo_label_smoothing),
    SharedSetting("loss.simpo_gamma", "simpo_gamma", read=lambda args: args.finetuning.simpo_gamma),
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
)
LOSS_ONLY_SETTINGS = ("loss.label_smoothing", "loss.simpo_gamma")
"""Read by the plugins' loss only: with LLaMA-Factory's own loss its keys keep their value there."""


def reconcile(
    model_args: Any,
    training_args: Any,
    finetuning_args: Any,
    config: VLMDPOConfig,
    written: Mapping[str, Set[str]],
    framework_written: Set[str],
    *,
    reads_reference: Callable[[str], bool],
) -> Reconciled:
    """Merge LLaMA-Factory's parsed arguments (changed in place) and ``config`` (replaced) into one set.

    ``reads_reference(loss_type)``: whether that loss variant reads reference log-probs (the plugin registry knows).
    """
    arguments = Arguments(model_args, training_args, finetuning_args)
    loss_type, framework_computes_loss, notes = _loss_type(finetuning_args, config, written, framework_written)
    table = [row for row in SHARED_SETTINGS if row.plugin_key != "loss.simpo_gamma" or loss_type == "simpo"]
    values = reconcile_shared(table, arguments, config, written, framework_written, KEY_NAMES)
    if framework_computes_loss:
        values = {key: value for key, value in values.items() if key not in LOSS_ONLY_SETTINGS}
    else:
        values["loss.type"] = loss_type

    def invalid(error: Exception) -> str:
        return (
            f"LLaMA-Factory's arguments and the vlm_dpo section together are invalid: {error}. The value may come "
            f"from LLaMA-Factory (pref_loss={finetuning_args.pref_loss!r}, pref_beta={finetuning_args.pref_beta}, "
            f"dpo_label_smoothing={finetuning_args.dpo_label_smoothing})"
        )

    config = with_values(config, values, invalid)
    config = reconcile_freeze_flags(
        config, FREEZE_FLAGS, lambda flag: getattr(finetuning_args, flag), framework_written, written, KEY_NAMES
    )
    reconciled = Reconciled(config, framework_computes_loss, notes)
    _write_back(reconciled, arguments, reads_reference)
    return reconciled


def _loss_type(
    finetuning_args: Any, config: VLMDPOConfig, written: Mapping[str, Set[str]], framework_written: Set[str]
) -> tuple[str, bool, list[str]]:
    pref_loss = finetuning_args.pref_loss
    loss = FrameworkLoss(
        "pref_loss",
        pref_loss,
        "pref_loss" in framework_written,
        plugin_type=None if pref_loss in FRAMEWORK_ONLY_LOSS_TYPES else pref_loss,
        own_options=_framework_only_options(finetuning_args),
    )
    # An unwritten pref_loss is LLaMA-Factory's default, sigmoid: the registry's default too.
    choice = choose_loss("LLaMA-Factory", loss, config, written.get("loss", set()), KEY_NAMES)
    return choice.type, choice.framework_computes, list(choice.notes)


def _framework_only_options(finetuning_args: Any) -> list[str]:
    options = []
    if finetuning_args.pref_bco_weight > 1e-6:
        options.append(f"pref_bco_weight={finetuning_args.pref_bco_weight}")
    if finetuning_args.ld_alpha is not None:
        options.append(f"ld_alpha={finetuning_args.ld_alpha}")
    return options


def _write_back(settings: Reconciled, arguments: Arguments, reads_reference: Callable[[str], bool]) -> None:
    """LLaMA-Factory's arguments as the plugin config says, before ``load_model`` and the trainer read them."""
    config, finetuning_args = settings.config, arguments.finetuning
    for flag, frozen in frozen_flags(config, FREEZE_FLAGS).items():
        setattr(finetuning_args, flag, frozen)
    if not settings.framework_computes_loss:
        finetuning_args.pref_beta = config.loss.beta
        if config.loss.type in SHARED_LOSS_TYPES:
            finetuning_args.pref_loss = config.loss.type
        # A reference model is built (full tuning) or the adapter disabled (LoRA) only when the variant reads it.
        finetuning_args.use_ref_model = reads_reference(config.loss.type)
        finetuning_args.dpo_label_smoothing = config.loss.label_smoothing if config.loss.type == "sigmoid" else 0.0
    if config.section("guards") is not None:
        arguments.model.use_reentrant_gc = not config.guards.non_reentrant_checkpointing
    training = arguments.training
    training.max_grad_norm = framework_max_grad_norm(config, bool(training.deepspeed), training.max_grad_norm)
