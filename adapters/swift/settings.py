"""What swift's arguments and the plugin config can both say, as one table (docs/swift.md).

"Written" means present on swift's command line, not swift's default. ``--loss_type`` stays swift's own code
(on fp32 log-probs) unless the plugin config writes ``loss.type``; then swift's loss options cannot apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer import settings as shared

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.errors import ConfigError

SWIFT_LOSS_OPTIONS = ("loss_type", "loss_weights", "rpo_alpha", "ld_alpha", "f_divergence_type", "reference_free")
"""Options of swift's own DPO loss: with ``loss.type`` from the plugin config none of them would apply."""


def _use_reentrant(args: Any) -> Any:
    return (args.training_args.gradient_checkpointing_kwargs or {}).get("use_reentrant")


SWIFT = shared.FrameworkSettings(
    "swift",
    "swift's arguments",
    shared.KeyNames(framework="swift's --{key}", plugin="the plugin config's {key}"),
    table=(
        *shared.same_named_settings(),
        shared.SharedSetting(
            "guards.non_reentrant_checkpointing",
            "gradient_checkpointing_kwargs use_reentrant",
            read=lambda args: bool(_use_reentrant(args)),
            to_plugin=lambda reentrant: not reentrant,
            written=lambda args, written: "gradient_checkpointing_kwargs" in written
            and _use_reentrant(args) is not None,
        ),
    ),
    freeze_flags={"vision": "freeze_vit", "projector": "freeze_aligner", "language": "freeze_llm"},
    learning_rate_flags={"vision": "vit_lr", "projector": "aligner_lr"},
)


def reconcile(
    args: Any, config: VLMDPOConfig, written: Mapping[str, Set[str]], swift_written: Set[str]
) -> shared.Reconciled:
    """Merge swift's parsed ``RLHFArguments`` (changed in place) and ``config`` (replaced) into one set."""
    reconciled = agree(args, config, written, swift_written)
    config, training_args = reconciled.config, args.training_args
    SWIFT.write_back(config, args, training_args, uses_deepspeed=bool(training_args.deepspeed))
    args.max_grad_norm = training_args.max_grad_norm
    if config.section("loss") is not None:
        for target in (args, training_args):
            target.beta = config.loss.beta
            # With the registry's loss swift's code does not run; the registry reads loss.label_smoothing.
            target.label_smoothing = config.loss.label_smoothing if reconciled.framework_computes_loss else 0.0
    return reconciled


def agree(args: Any, config: VLMDPOConfig, written: Mapping[str, Set[str]], swift_written: Set[str]):
    """The agreed settings, swift's arguments untouched: a conflict is an error before swift reads any data."""
    loss = shared.FrameworkLoss(
        "loss_type",
        args.loss_type,
        "loss_type" in swift_written,
        plugin_type=None,  # swift's own loss code, on fp32 log-probs (trainer.get_per_token_logps)
        own_options=[option for option in SWIFT_LOSS_OPTIONS if option in swift_written and option != "loss_type"],
        computes_by_default=True,
    )
    reconciled = SWIFT.reconcile(args, config, written, swift_written, loss, flags_on=args)
    if not reconciled.framework_computes_loss and (args.padding_free or args.packing):
        raise ConfigError(
            f"loss.type {reconciled.config.loss.type!r} reads one row per sequence, but swift packs rows "
            "(--padding_free/--packing): drop those flags, or drop loss.type to keep swift's loss"
        )
    return reconciled
