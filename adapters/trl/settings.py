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
    FrameworkSettings,
    KeyNames,
    Reconciled,
    SharedSetting,
    same_named_settings,
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


def _use_reentrant(args: Any) -> Any:
    return (args.gradient_checkpointing_kwargs or {}).get("use_reentrant")


TRL = FrameworkSettings(
    "TRL",
    "DPOConfig",
    KeyNames(framework="DPOConfig.{key}", plugin="the plugin config's {key}"),
    table=(
        *same_named_settings(),
        SharedSetting(
            "guards.non_reentrant_checkpointing",
            "gradient_checkpointing_kwargs['use_reentrant']",
            read=_use_reentrant,
            to_plugin=lambda reentrant: not reentrant,
            written=lambda args, _: _use_reentrant(args) is not None,
        ),
        # TRL refuses its own precompute for image data; the plugins' pass replaces it (docs/trl.md).
        SharedSetting(
            "sharing.reference",
            "precompute_ref_log_probs",
            read=lambda args: args.precompute_ref_log_probs,
            to_plugin=lambda precompute: "precompute" if precompute else "live",
        ),
    ),
    loss_only=("loss.label_smoothing",),  # TRL's own loss reads DPOConfig.label_smoothing
)


def reconcile(args: Any, config: VLMDPOConfig, written: Mapping[str, set[str]]) -> Reconciled:
    """Merge ``args`` (a ``DPOConfig``, changed in place) and ``config`` (replaced) into one consistent set."""
    trl_set = _trl_fields_set(args)
    trl_loss = list(args.loss_type)
    loss = FrameworkLoss(
        "loss_type",
        trl_loss,
        "loss_type" in trl_set,
        plugin_type=trl_loss[0] if len(trl_loss) == 1 and trl_loss[0] in SHARED_LOSS_TYPES else None,
        own_options=[name for name in TRL_ONLY_LOSS_OPTIONS if name in trl_set],
    )
    reconciled = TRL.reconcile(args, config, written, trl_set, loss)
    loss_section = reconciled.config.section("loss")
    if loss_section is not None:
        # A value DPOConfig did not write is the agreed one, which TRL's loss and metrics read from DPOConfig.
        for name in ("beta", "label_smoothing"):
            if name not in trl_set:
                setattr(args, name, getattr(loss_section, name))
    if not reconciled.framework_computes_loss and reconciled.config.section("sharing") is not None:
        args.precompute_ref_log_probs = False  # the plugins' pass, when asked for, runs instead of TRL's
    if not reconciled.framework_computes_loss and loss_section.type == "sigmoid":
        if args.label_smoothing > 0 and "label_smoothing" in trl_set:
            reconciled.notes.append(
                f"label_smoothing={args.label_smoothing} with the sigmoid loss trains conservative DPO (cDPO); "
                "TRL's own sigmoid loss would have ignored it"
            )
    return reconciled


def _trl_fields_set(args: Any) -> set[str]:
    defaults = {}
    for entry in dataclasses.fields(type(args)):
        if entry.default is not dataclasses.MISSING:
            defaults[entry.name] = entry.default
        elif entry.default_factory is not dataclasses.MISSING:
            defaults[entry.name] = entry.default_factory()
    watched = ("beta", "label_smoothing", "loss_type", "max_grad_norm", "precompute_ref_log_probs")
    watched += tuple(TRL_ONLY_LOSS_OPTIONS)
    return {name for name in watched if name in defaults and getattr(args, name) != defaults[name]}
