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

import dataclasses
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.validation import FieldError

# Same name and formula in LLaMA-Factory 0.9.5 and in the built-in registry (tests compare the values).
SHARED_LOSS_TYPES = frozenset({"sigmoid", "hinge", "ipo", "simpo"})
FRAMEWORK_ONLY_LOSS_TYPES = frozenset({"orpo", "kto_pair"})
FREEZE_FLAGS = {
    "vision": "freeze_vision_tower",
    "projector": "freeze_multi_modal_projector",
    "language": "freeze_language_model",
}


@dataclass
class Settings:
    config: VLMDPOConfig
    framework_computes_loss: bool
    """True for a loss only LLaMA-Factory has: the loss hooks then stay out, every other hook runs."""
    notes: list[str] = field(default_factory=list)


def reconcile(
    model_args: Any,
    training_args: Any,
    finetuning_args: Any,
    config: VLMDPOConfig,
    written: Mapping[str, Set[str]],
    framework_written: Set[str],
    *,
    reads_reference: Callable[[str], bool],
) -> Settings:
    """Merge LLaMA-Factory's parsed arguments (changed in place) and ``config`` (replaced) into one set.

    ``reads_reference(loss_type)``: whether that loss variant reads reference log-probs (the plugin registry knows).
    """
    notes: list[str] = []
    loss_written = written.get("loss", set())
    guards_written = written.get("guards", set())
    framework_options = _framework_only_options(finetuning_args)
    framework_computes_loss = False
    loss_type = config.loss.type

    if "type" in loss_written:
        if "pref_loss" in framework_written and finetuning_args.pref_loss != config.loss.type:
            raise ConfigError(
                f"LLaMA-Factory's pref_loss is {finetuning_args.pref_loss!r} and vlm_dpo.loss.type is "
                f"{config.loss.type!r}: set the loss in one place (vlm_dpo.loss.type covers every built-in variant, "
                "mDPO included)"
            )
        if framework_options:
            raise ConfigError(
                f"LLaMA-Factory's {', '.join(framework_options)} only applies to its own loss, but vlm_dpo.loss.type "
                f"{config.loss.type!r} replaces that loss: drop those keys, or drop vlm_dpo.loss.type"
            )
    elif finetuning_args.pref_loss in FRAMEWORK_ONLY_LOSS_TYPES or framework_options:
        framework_computes_loss = True
        reason = f"pref_loss {finetuning_args.pref_loss!r}" if not framework_options else ", ".join(framework_options)
        notes.append(f"LLaMA-Factory computes the loss ({reason} is its own); every other hook runs")
    else:
        loss_type = finetuning_args.pref_loss

    beta = _one_value(
        "pref_beta", finetuning_args.pref_beta, "loss.beta", config.loss.beta, framework_written, loss_written
    )
    smoothing = _one_value(
        "dpo_label_smoothing",
        finetuning_args.dpo_label_smoothing,
        "loss.label_smoothing",
        config.loss.label_smoothing,
        framework_written,
        loss_written,
    )
    simpo_gamma = config.loss.simpo_gamma
    if loss_type == "simpo":
        simpo_gamma = _one_value(
            "simpo_gamma",
            finetuning_args.simpo_gamma,
            "loss.simpo_gamma",
            config.loss.simpo_gamma,
            framework_written,
            loss_written,
        )

    framework_norm = (
        training_args.max_grad_norm if training_args.max_grad_norm and training_args.max_grad_norm > 0 else None
    )
    max_grad_norm = _one_value(
        "max_grad_norm",
        framework_norm,
        "guards.max_grad_norm",
        config.guards.max_grad_norm,
        framework_written,
        guards_written,
        plugin_written_key="max_grad_norm",
    )
    non_reentrant = config.guards.non_reentrant_checkpointing
    if "use_reentrant_gc" in framework_written:
        non_reentrant = not _one_value(
            "use_reentrant_gc",
            bool(model_args.use_reentrant_gc),
            "guards.non_reentrant_checkpointing (negated)",
            not non_reentrant,
            framework_written,
            guards_written,
            plugin_written_key="non_reentrant_checkpointing",
        )
    freeze = _reconciled_freeze(config, finetuning_args, written.get("freeze", set()), framework_written)

    try:
        loss = config.loss
        if not framework_computes_loss:
            loss = dataclasses.replace(
                loss, type=loss_type, beta=beta, label_smoothing=smoothing, simpo_gamma=simpo_gamma
            )
        else:
            loss = dataclasses.replace(loss, beta=beta)
        guards = dataclasses.replace(
            config.guards, max_grad_norm=max_grad_norm, non_reentrant_checkpointing=non_reentrant
        )
    except FieldError as error:
        raise ConfigError(
            f"LLaMA-Factory's arguments and the vlm_dpo section together are invalid: {error}. The value may come "
            f"from LLaMA-Factory (pref_loss={finetuning_args.pref_loss!r}, pref_beta={finetuning_args.pref_beta}, "
            f"dpo_label_smoothing={finetuning_args.dpo_label_smoothing})"
        ) from error
    settings = Settings(
        dataclasses.replace(config, loss=loss, guards=guards, freeze=freeze), framework_computes_loss, notes
    )
    _write_back(settings, model_args, training_args, finetuning_args, reads_reference)
    return settings


def _framework_only_options(finetuning_args: Any) -> list[str]:
    options = []
    if finetuning_args.pref_bco_weight > 1e-6:
        options.append(f"pref_bco_weight={finetuning_args.pref_bco_weight}")
    if finetuning_args.ld_alpha is not None:
        options.append(f"ld_alpha={finetuning_args.ld_alpha}")
    return options


def _reconciled_freeze(
    config: VLMDPOConfig, finetuning_args: Any, freeze_written: Set[str], framework_written: Set[str]
):
    from_flags = tuple(group for group, flag in FREEZE_FLAGS.items() if not getattr(finetuning_args, flag))
    if "trainable" not in freeze_written:
        return dataclasses.replace(config.freeze, trainable=from_flags)
    for group, flag in FREEZE_FLAGS.items():
        if flag not in framework_written:
            continue
        frozen_by_flag = bool(getattr(finetuning_args, flag))
        if frozen_by_flag == (group in config.freeze.trainable):
            raise ConfigError(
                f"LLaMA-Factory's {flag} is {frozen_by_flag} and vlm_dpo.freeze.trainable is "
                f"{list(config.freeze.trainable)}: say whether the {group} group trains in one place"
            )
    return config.freeze


def _write_back(
    settings: Settings,
    model_args: Any,
    training_args: Any,
    finetuning_args: Any,
    reads_reference: Callable[[str], bool],
) -> None:
    """LLaMA-Factory's arguments as the plugin config says, before ``load_model`` and the trainer read them."""
    config = settings.config
    ever_trained = config.freeze.groups_ever_trained()
    for group, flag in FREEZE_FLAGS.items():
        setattr(finetuning_args, flag, group not in ever_trained)
    if not settings.framework_computes_loss:
        finetuning_args.pref_beta = config.loss.beta
        if config.loss.type in SHARED_LOSS_TYPES:
            finetuning_args.pref_loss = config.loss.type
        # A reference model is built (full tuning) or the adapter disabled (LoRA) only when the variant reads it.
        finetuning_args.use_ref_model = reads_reference(config.loss.type)
        finetuning_args.dpo_label_smoothing = config.loss.label_smoothing if config.loss.type == "sigmoid" else 0.0
    model_args.use_reentrant_gc = not config.guards.non_reentrant_checkpointing
    if training_args.deepspeed:
        training_args.max_grad_norm = config.guards.max_grad_norm or 0.0  # DeepSpeed's "gradient_clipping": "auto"
    else:
        training_args.max_grad_norm = 0.0  # the guards clip, per group, inside the guarded step


def _one_value(
    framework_key: str,
    framework_value: Any,
    plugin_key: str,
    plugin_value: Any,
    framework_written: Set[str],
    plugin_written: Set[str],
    *,
    plugin_written_key: str | None = None,
) -> Any:
    framework_set = framework_key in framework_written
    plugin_set = (plugin_written_key or plugin_key.split(".")[-1]) in plugin_written
    if framework_set and plugin_set and framework_value != plugin_value:
        raise ConfigError(
            f"LLaMA-Factory's {framework_key} is {framework_value!r} and vlm_dpo.{plugin_key} is {plugin_value!r}: "
            "set it in one place"
        )
    return framework_value if framework_set else plugin_value
