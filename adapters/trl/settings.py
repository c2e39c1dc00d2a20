"""One source of truth for the settings that ``DPOConfig`` and the plugin config can both hold.

A TRL user who swaps ``DPOTrainer`` for ``VLMDPOTrainer`` keeps their ``DPOConfig``:
its ``beta``, ``loss_type``, ``label_smoothing``, ``max_grad_norm`` and
``gradient_checkpointing_kwargs`` keep meaning what they meant. A value set in only
one of the two configs is used by both; a value set differently in both is an error
naming both keys, never a silent choice. "Set" means written by the user: for the
plugin config, a key present in the mapping or YAML (or, for a ``VLMDPOConfig``
object, a value other than the default); for ``DPOConfig``, a value other than TRL's
default.

Loss types TRL has and the built-in registry does not (``exo_pair``, ``aot``, ...),
or TRL-only loss options (``loss_weights``, ``ld_alpha``, f-divergences, WPO
weighting), leave the loss to TRL; every other hook still runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.config_source import PluginSource  # noqa: F401 (the type VLMDPOTrainer accepts)
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.validation import FieldError

# Same name and the same formula in TRL 1.16 and in the built-in registry (tests compare the values).
SHARED_LOSS_TYPES = frozenset({"sigmoid", "hinge", "ipo", "robust"})
TRL_ONLY_LOSS_OPTIONS = {
    "loss_weights": None,
    "ld_alpha": None,
    "f_divergence_type": "reverse_kl",
    "use_weighting": False,
}


@dataclass
class Settings:
    config: VLMDPOConfig
    trl_computes_loss: bool
    """True when the loss is TRL's own (a TRL-only loss type or option); the loss hooks then stay out."""
    notes: list[str] = field(default_factory=list)


def reconcile(args: Any, config: VLMDPOConfig, written: Mapping[str, set[str]]) -> Settings:
    """Merge ``args`` (a ``DPOConfig``, changed in place) and ``config`` (replaced) into one consistent set."""
    trl_set = _trl_fields_set(args)
    loss_written = written.get("loss", set())
    notes: list[str] = []

    trl_options = [name for name in TRL_ONLY_LOSS_OPTIONS if name in trl_set]
    trl_loss = list(args.loss_type)
    trl_only_type = len(trl_loss) != 1 or trl_loss[0] not in SHARED_LOSS_TYPES
    trl_computes_loss = False
    loss_type = config.loss.type
    if "type" in loss_written:
        if "loss_type" in trl_set and trl_loss != [config.loss.type]:
            raise ConfigError(
                f"DPOConfig.loss_type is {trl_loss} and the plugin config's loss.type is {config.loss.type!r}: "
                "set the loss in one place (loss.type covers every built-in variant, mDPO included)"
            )
        if trl_options:
            raise ConfigError(
                f"DPOConfig sets {', '.join(trl_options)}, which only TRL's own loss reads, but the plugin config's "
                f"loss.type {config.loss.type!r} replaces TRL's loss: drop those DPOConfig options, or drop loss.type "
                "to let TRL compute its loss"
            )
    elif trl_only_type or trl_options:
        trl_computes_loss = True
        reason = f"loss_type={trl_loss}" if trl_only_type else ", ".join(trl_options)
        notes.append(
            f"TRL computes the loss ({reason} is TRL's own); the plugins' loss variants are not used, every other "
            "hook runs"
        )
    elif "loss_type" in trl_set:
        loss_type = trl_loss[0]

    beta = _one_value("beta", args.beta, config.loss.beta, "beta" in trl_set, "beta" in loss_written)
    smoothing = _one_value(
        "label_smoothing",
        args.label_smoothing,
        config.loss.label_smoothing,
        "label_smoothing" in trl_set,
        "label_smoothing" in loss_written,
    )
    if not trl_computes_loss and loss_type == "sigmoid" and smoothing > 0 and "label_smoothing" in trl_set:
        notes.append(
            f"label_smoothing={smoothing} with the sigmoid loss trains conservative DPO (cDPO); TRL's own sigmoid "
            "loss would have ignored it"
        )
    args.beta = beta
    args.label_smoothing = smoothing

    trl_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
    max_grad_norm = _one_value(
        "max_grad_norm",
        trl_norm,
        config.guards.max_grad_norm,
        "max_grad_norm" in trl_set,
        "max_grad_norm" in written.get("guards", set()),
        plugin_key="guards.max_grad_norm",
    )

    non_reentrant = config.guards.non_reentrant_checkpointing
    user_reentrant = (args.gradient_checkpointing_kwargs or {}).get("use_reentrant")
    if user_reentrant is not None:
        non_reentrant = not _one_value(
            "gradient_checkpointing_kwargs['use_reentrant']",
            bool(user_reentrant),
            not non_reentrant,
            True,
            "non_reentrant_checkpointing" in written.get("guards", set()),
            plugin_key="guards.non_reentrant_checkpointing (negated)",
        )

    try:
        loss = config.loss
        if not trl_computes_loss:
            loss = dataclasses.replace(loss, type=loss_type, beta=beta, label_smoothing=smoothing)
        else:
            loss = dataclasses.replace(loss, beta=beta)
        guards = dataclasses.replace(
            config.guards, max_grad_norm=max_grad_norm, non_reentrant_checkpointing=non_reentrant
        )
    except FieldError as error:
        raise ConfigError(
            f"DPOConfig and the plugin config together are invalid: {error}. The value may come from DPOConfig "
            f"(loss_type={trl_loss}, beta={args.beta}, label_smoothing={args.label_smoothing})"
        ) from error
    return Settings(dataclasses.replace(config, loss=loss, guards=guards), trl_computes_loss, notes)


def _one_value(
    name: str, trl_value: Any, plugin_value: Any, trl_set: bool, plugin_set: bool, *, plugin_key: str | None = None
) -> Any:
    if trl_set and plugin_set and trl_value != plugin_value:
        raise ConfigError(
            f"DPOConfig.{name} is {trl_value!r} and the plugin config's {plugin_key or 'loss.' + name} is "
            f"{plugin_value!r}: set it in one place"
        )
    return trl_value if trl_set else plugin_value


def _trl_fields_set(args: Any) -> set[str]:
    defaults = {}
    for entry in dataclasses.fields(type(args)):
        if entry.default is not dataclasses.MISSING:
            defaults[entry.name] = entry.default
        elif entry.default_factory is not dataclasses.MISSING:
            defaults[entry.name] = entry.default_factory()
    watched = ("beta", "label_smoothing", "loss_type", "max_grad_norm", *TRL_ONLY_LOSS_OPTIONS)
    return {name for name in watched if name in defaults and getattr(args, name) != defaults[name]}
