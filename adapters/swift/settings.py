"""One source of truth for what swift's arguments and the plugin config can both say.

Swift's own flags keep meaning what they mean: ``--beta``, ``--label_smoothing``,
``--max_grad_norm``, ``--gradient_checkpointing_kwargs`` (its ``use_reentrant``),
``--freeze_vit/--freeze_aligner/--freeze_llm`` and ``--vit_lr/--aligner_lr``. A value written
in one place is used by both; written differently in both, it is an error naming both.
"Written" means present on swift's command line, not swift's default.

The loss: ``--loss_type`` (with ``--loss_weights``, ``--rpo_alpha``, ``--ld_alpha``, ...) is
computed by swift's own code, on fp32 log-probs. ``loss.type`` in the plugin config replaces
it with the registry's variant (mDPO included); swift's loss options then cannot apply.

After reconciling, swift's arguments are rewritten before ``prepare_model`` reads them: the
freeze flags mark every group the policy ever trains (so LoRA targets cover the unfreeze
stages; the policy freezes the later ones at step 0) and ``max_grad_norm`` is 0 outside
DeepSpeed because the guards clip, per group, inside the guarded optimizer step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.validation import FieldError

FREEZE_FLAGS = {"vision": "freeze_vit", "projector": "freeze_aligner", "language": "freeze_llm"}
LEARNING_RATE_FLAGS = {"vision": "vit_lr", "projector": "aligner_lr"}
SWIFT_LOSS_OPTIONS = ("loss_type", "loss_weights", "rpo_alpha", "ld_alpha", "f_divergence_type", "reference_free")
"""Options of swift's own DPO loss: with ``loss.type`` from the plugin config none of them would apply."""


@dataclass
class Settings:
    config: VLMDPOConfig
    framework_computes_loss: bool
    """True unless the plugin config chose ``loss.type``: swift's ``--loss_type`` code computes the loss."""
    notes: list[str] = field(default_factory=list)


def written_arguments(argv: Iterable[str]) -> set[str]:
    """The swift argument names present on a command line (``--name value`` or ``--name=value``)."""
    names = set()
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            names.add(token[2:].split("=", 1)[0].replace("-", "_"))
    return names


def reconcile(args: Any, config: VLMDPOConfig, written: Mapping[str, Set[str]], swift_written: Set[str]) -> Settings:
    """Merge swift's parsed ``RLHFArguments`` (changed in place) and ``config`` (replaced) into one set."""
    training_args = args.training_args
    loss_written = written.get("loss", set())
    guards_written = written.get("guards", set())
    notes: list[str] = []

    framework_computes_loss = "type" not in loss_written
    if not framework_computes_loss:
        clashing = [option for option in SWIFT_LOSS_OPTIONS if option in swift_written]
        if clashing:
            raise ConfigError(
                f"swift's {', '.join('--' + option for option in clashing)} and the plugin config's loss.type "
                f"{config.loss.type!r} both choose the loss: set it in one place (loss.type covers every built-in "
                "variant, mDPO included; swift's --loss_type list covers swift's own)"
            )
        if args.padding_free or args.packing:
            raise ConfigError(
                f"loss.type {config.loss.type!r} reads one row per sequence, but swift packs rows "
                "(--padding_free/--packing): drop those flags, or drop loss.type to keep swift's loss"
            )
    else:
        notes.append(f"swift computes the loss (--loss_type {args.loss_type}) on fp32 log-probs")

    beta = _one_value("beta", args.beta, "loss.beta", config.loss.beta, swift_written, loss_written)
    smoothing = _one_value(
        "label_smoothing",
        args.label_smoothing,
        "loss.label_smoothing",
        config.loss.label_smoothing,
        swift_written,
        loss_written,
    )
    swift_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
    max_grad_norm = _one_value(
        "max_grad_norm", swift_norm, "guards.max_grad_norm", config.guards.max_grad_norm, swift_written, guards_written
    )
    non_reentrant = _reconciled_reentrancy(args, config, swift_written, guards_written)
    freeze = _reconciled_freeze(args, config, written.get("freeze", set()), swift_written)

    try:
        loss = dataclasses.replace(config.loss, beta=beta, label_smoothing=smoothing)
        guards = dataclasses.replace(
            config.guards, max_grad_norm=max_grad_norm, non_reentrant_checkpointing=non_reentrant
        )
    except FieldError as error:
        raise ConfigError(
            f"swift's arguments and the plugin config together are invalid: {error}. The value may come from swift "
            f"(--beta {args.beta}, --label_smoothing {args.label_smoothing}, --max_grad_norm {args.max_grad_norm})"
        ) from error
    settings = Settings(
        dataclasses.replace(config, loss=loss, guards=guards, freeze=freeze), framework_computes_loss, notes
    )
    _write_back(settings, args, training_args)
    return settings


def _reconciled_reentrancy(args: Any, config: VLMDPOConfig, swift_written: Set[str], guards_written: Set[str]) -> bool:
    kwargs = args.training_args.gradient_checkpointing_kwargs or {}
    if "gradient_checkpointing_kwargs" not in swift_written or "use_reentrant" not in kwargs:
        return config.guards.non_reentrant_checkpointing
    reentrant = bool(kwargs["use_reentrant"])
    if "non_reentrant_checkpointing" in guards_written and config.guards.non_reentrant_checkpointing == reentrant:
        raise ConfigError(
            f"swift's --gradient_checkpointing_kwargs says use_reentrant={reentrant} and the plugin config's "
            f"guards.non_reentrant_checkpointing is {config.guards.non_reentrant_checkpointing}: set it in one place"
        )
    return not reentrant


def _reconciled_freeze(args: Any, config: VLMDPOConfig, freeze_written: Set[str], swift_written: Set[str]):
    freeze = config.freeze
    if "trainable" not in freeze_written:
        trainable = tuple(group for group, flag in FREEZE_FLAGS.items() if not getattr(args, flag))
        freeze = dataclasses.replace(freeze, trainable=trainable)
    else:
        for group, flag in FREEZE_FLAGS.items():
            frozen_by_flag = bool(getattr(args, flag))
            if flag in swift_written and frozen_by_flag == (group in freeze.trainable):
                raise ConfigError(
                    f"swift's --{flag} is {frozen_by_flag} and the plugin config's freeze.trainable is "
                    f"{list(freeze.trainable)}: say whether the {group} group trains in one place"
                )
    rates = dict(freeze.learning_rates)
    for group, flag in LEARNING_RATE_FLAGS.items():
        swift_rate = getattr(args, flag)
        if flag not in swift_written or swift_rate is None:
            continue
        if group in rates and rates[group] != swift_rate:
            raise ConfigError(
                f"swift's --{flag} is {swift_rate} and the plugin config's freeze.learning_rates.{group} is "
                f"{rates[group]}: set it in one place"
            )
        rates[group] = swift_rate
    try:
        return dataclasses.replace(freeze, learning_rates=rates)
    except FieldError as error:
        raise ConfigError(
            f"swift's --vit_lr/--aligner_lr and the freeze policy together are invalid: {error}. A learning rate "
            "applies only to a group that trains (--freeze_vit false / --freeze_aligner false, or freeze.trainable)"
        ) from error


def _write_back(settings: Settings, args: Any, training_args: Any) -> None:
    """Swift's arguments as the plugin config says, before ``prepare_model`` and the trainer read them."""
    config = settings.config
    ever_trained = config.freeze.groups_ever_trained()
    for group, flag in FREEZE_FLAGS.items():
        setattr(args, flag, group not in ever_trained)
    for target in (args, training_args):
        target.beta = config.loss.beta
        # With the registry's loss swift's code does not run; the registry reads loss.label_smoothing.
        target.label_smoothing = config.loss.label_smoothing if settings.framework_computes_loss else 0.0
        if training_args.deepspeed:
            target.max_grad_norm = config.guards.max_grad_norm or 0.0  # DeepSpeed clips ("gradient_clipping")
        else:
            target.max_grad_norm = 0.0  # the guards clip, per group, inside the guarded step


def _one_value(
    swift_key: str,
    swift_value: Any,
    plugin_key: str,
    plugin_value: Any,
    swift_written: Set[str],
    plugin_written: Set[str],
) -> Any:
    swift_set = swift_key in swift_written
    plugin_set = plugin_key.split(".")[-1] in plugin_written
    if swift_set and plugin_set and swift_value != plugin_value:
        raise ConfigError(
            f"swift's --{swift_key} is {swift_value!r} and the plugin config's {plugin_key} is {plugin_value!r}: "
            "set it in one place"
        )
    return swift_value if swift_set else plugin_value
