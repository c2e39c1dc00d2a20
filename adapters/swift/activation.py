"""Wires the adapter into ms-swift when ``--external_plugins`` executes the plugin file (docs/swift.md).

Places swift reads after the plugin file ran: ``TRAINER_MAPPING['dpo']`` (the trainer),
``_prepare_model_tokenizer`` (settings checked to agree before any model or data loads), ``_get_dataset`` (files
checked before swift reads them) and ``prepare_model`` (settings reconciled before LoRA or the full-tuning freeze
are applied from swift's arguments).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.activation import SupportedReleases, wrap_once
from vlm_dpo_plugins.adapters.hf_trainer.console import configure_logging

TRAINER_PATH = "vlm_dpo_plugins.adapters.swift.trainer.PluginDPOTrainer"
STOCK_TRAINER_PATH = "swift.rlhf_trainers.DPOTrainer"
RELEASES = SupportedReleases("ms-swift", "ms-swift", minimum="4.6", below="5", tested="4.6.0")
SUPPORTED_RANGE = RELEASES.range
logger = logging.getLogger("vlm_dpo_plugins.adapters.swift")


def activate() -> bool:
    """Point swift's DPO trainer at the plugin subclass; True when active. Calling it again changes nothing."""
    import swift

    configure_logging("[%(levelname)s:%(name)s] %(message)s")  # swift's own line format
    if RELEASES.stays_off(swift.__version__):
        return False
    from swift.pipelines.train.rlhf import SwiftRLHF
    from swift.trainers import TrainerFactory

    mapping = TrainerFactory.TRAINER_MAPPING
    if mapping["dpo"] not in (STOCK_TRAINER_PATH, TRAINER_PATH):
        logger.warning(
            "vlm-dpo: another plugin replaced swift's DPO trainer with %s; the adapter stays off (load only one)",
            mapping["dpo"],
        )
        return False
    mapping["dpo"] = TRAINER_PATH
    wrap_once(SwiftRLHF, "prepare_model", _prepare_model, unwrap=lambda held: held.__func__)
    wrap_once(SwiftRLHF, "_get_dataset", _get_dataset)
    wrap_once(SwiftRLHF, "_prepare_model_tokenizer", _prepare_model_tokenizer)
    return True


def _prepare_model(stock: Any) -> Any:
    """Swift applies LoRA or the full-tuning freeze from its arguments here: the run is prepared just before."""

    @functools.wraps(stock)
    def prepare_model(cls: Any, args: Any, model: Any, *positional: Any, **kwargs: Any) -> Any:
        if getattr(args, "rlhf_type", None) == "dpo":
            from vlm_dpo_plugins.adapters.swift.workflow import prepare_run

            prepare_run(args)
        return stock(cls, args, model, *positional, **kwargs)

    return prepare_model


def _prepare_model_tokenizer(stock: Any) -> Any:
    """The first thing swift does with its parsed arguments is load the models: settings that conflict stop the
    run before that, and long before swift encodes the dataset."""

    @functools.wraps(stock)
    def prepare_model_tokenizer(self: Any, *positional: Any, **kwargs: Any) -> Any:
        if getattr(self.args, "rlhf_type", None) == "dpo":
            from vlm_dpo_plugins.adapters.swift.workflow import check_settings

            check_settings(self.args)
        return stock(self, *positional, **kwargs)

    return prepare_model_tokenizer


def _get_dataset(stock: Any) -> Any:
    @functools.wraps(stock)
    def get_dataset(self: Any) -> Any:
        if getattr(self.args, "rlhf_type", None) != "dpo":
            return stock(self)
        from vlm_dpo_plugins.adapters.swift.data_checks import checked_loading
        from vlm_dpo_plugins.adapters.swift.workflow import current_run

        run = current_run(self.args)
        with checked_loading(self.args, run.plugins, run.config.collation) as run.checked_files:
            return stock(self)

    return get_dataset
