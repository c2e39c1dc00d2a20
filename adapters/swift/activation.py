"""Wires the adapter into ms-swift when ``--external_plugins`` executes the plugin file (docs/swift.md).

Places swift reads after the plugin file ran: ``TRAINER_MAPPING['dpo']`` (the trainer), and three steps of
``SwiftRLHF``, each commented where it is wrapped.
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
    # Swift applies LoRA or the full-tuning freeze from its arguments in prepare_model: the run is prepared first.
    wrap_once(SwiftRLHF, "prepare_model", _first_in_dpo_runs("prepare_run", True), unwrap=lambda held: held.__func__)
    # The first thing swift does with its parsed arguments is load the models: settings that conflict stop the run
    # before that, and long before swift encodes the dataset.
    wrap_once(SwiftRLHF, "_prepare_model_tokenizer", _first_in_dpo_runs("check_settings"))
    wrap_once(SwiftRLHF, "_get_dataset", _get_dataset)
    return True


def _first_in_dpo_runs(step: str, args_given: bool = False) -> Any:
    """Wraps a ``SwiftRLHF`` method to call ``workflow.<step>(args)`` first in a DPO run.

    ``args_given``: the method takes swift's arguments as its first argument, instead of reading ``self.args``.
    """

    def make(stock: Any) -> Any:
        @functools.wraps(stock)
        def wrapped(owner: Any, *positional: Any, **kwargs: Any) -> Any:
            args = positional[0] if args_given else owner.args
            if getattr(args, "rlhf_type", None) == "dpo":
                from vlm_dpo_plugins.adapters.swift import workflow

                getattr(workflow, step)(args)
            return stock(owner, *positional, **kwargs)

        return wrapped

    return make


def _get_dataset(stock: Any) -> Any:
    @functools.wraps(stock)
    def get_dataset(self: Any) -> Any:
        if getattr(self.args, "rlhf_type", None) != "dpo":
            return stock(self)
        from vlm_dpo_plugins.adapters.swift.data_checks import checked_loading
        from vlm_dpo_plugins.adapters.swift.workflow import current_run

        run = current_run(self.args)
        with checked_loading(self.args, run.settings.plugins, run.settings.config.collation) as run.checked_files:
            return stock(self)

    return get_dataset
