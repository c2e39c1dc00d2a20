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
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.settings import (
    FrameworkLoss,
    KeyNames,
    Reconciled,
    SharedSetting,
    choose_loss,
    reconcile_shared,
    same_named_settings,
    with_values,
)

from vlm_dpo_plugins.config import VLMDPOConfig

# Same name and the same formula in TRL 1.16 and in the built-in registry (tests compare the values).
SHARED_LOSS_TYPES = frozenset({"sigmoid", "hinge", "ipo", "robust"})
TRL_ONLY_LOSS_OPTIONS = {
    "loss_weights": None,
    "ld_alpha": None,
    "f_divergence_type": "reverse_kl",
    "use_weighting": False,
}


KEY_NAMES = KeyNames(framework="DPOConfig.{key}", plugin="the plugin config's {key}")
SHARED_SETTINGS = (
    *same_named_settings(),
    SharedSetting(
        "guards.non_reentrant_checkpointing",
        "gradient_checkpointing_kwargs['use_reentrant']",
        read=lambda args: (args.gradient_checkpointing_kwargs or {}).get("use_reentrant"),
        to_plugin=lambda reentrant: not reentrant,
        written=lambda args, _: (args.gradient_checkpointing_kwargs or {}).get("use_reentrant") is not None,
    ),
)


def reconcile(args: Any, config: VLMDPOConfig, written: Mapping[str, set[str]]) -> Reconciled:
    """Merge ``args`` (a ``DPOConfig``, changed in place) and ``config`` (replaced) into one consistent set."""
    trl_set = _trl_fields_set(args)
    loss_type, trl_computes_loss, notes = _loss_type(args, config, written.get("loss", set()), trl_set)
    values = reconcile_shared(SHARED_SETTINGS, args, config, written, trl_set, KEY_NAMES)
    args.beta = values.get("loss.beta", args.beta)
    args.label_smoothing = values.get("loss.label_smoothing", args.label_smoothing)
    if trl_computes_loss:
        values.pop("loss.label_smoothing", None)  # TRL's loss reads it from DPOConfig
    else:
        values["loss.type"] = loss_type
        if loss_type == "sigmoid" and args.label_smoothing > 0 and "label_smoothing" in trl_set:
            notes.append(
                f"label_smoothing={args.label_smoothing} with the sigmoid loss trains conservative DPO (cDPO); "
                "TRL's own sigmoid loss would have ignored it"
            )

    def invalid(error: Exception) -> str:
        return (
            f"DPOConfig and the plugin config together are invalid: {error}. The value may come from DPOConfig "
            f"(loss_type={list(args.loss_type)}, beta={args.beta}, label_smoothing={args.label_smoothing})"
        )

    return Reconciled(with_values(config, values, invalid), trl_computes_loss, notes)


def _loss_type(args: Any, config: VLMDPOConfig, loss_written: set[str], trl_set: set[str]) -> tuple[str, bool, list]:
    trl_loss = list(args.loss_type)
    shared_type = trl_loss[0] if len(trl_loss) == 1 and trl_loss[0] in SHARED_LOSS_TYPES else None
    loss = FrameworkLoss(
        "loss_type",
        trl_loss,
        "loss_type" in trl_set,
        plugin_type=shared_type,
        own_options=[name for name in TRL_ONLY_LOSS_OPTIONS if name in trl_set],
    )
    choice = choose_loss("TRL", loss, config, loss_written, KEY_NAMES)
    return choice.type, choice.framework_computes, list(choice.notes)


def _trl_fields_set(args: Any) -> set[str]:
    defaults = {}
    for entry in dataclasses.fields(type(args)):
        if entry.default is not dataclasses.MISSING:
            defaults[entry.name] = entry.default
        elif entry.default_factory is not dataclasses.MISSING:
            defaults[entry.name] = entry.default_factory()
    watched = ("beta", "label_smoothing", "loss_type", "max_grad_norm", *TRL_ONLY_LOSS_OPTIONS)
    return {name for name in watched if name in defaults and getattr(args, name) != defaults[name]}
