"""Wires the adapter into ms-swift when ``--external_plugins`` executes the plugin file.

Three places in swift, all read after the plugin file ran:

- ``TrainerFactory.TRAINER_MAPPING['dpo']``: the dotted path swift imports its DPO trainer
  from, pointed at ``PluginDPOTrainer`` (swift's ``DPOTrainer`` with every hook);
- ``SwiftRLHF._get_dataset``: the ``--dataset`` files checked before swift reads them, their
  skipped rows left out (``data_checks.py``);
- ``SwiftRLHF.prepare_model``, which applies LoRA or the full-tuning freeze from swift's
  arguments: before it runs, the plugin config is reconciled with those arguments and
  swift's arguments rewritten (``workflow.py``), so LoRA targets, checkpointing and DDP
  settings follow the plugins.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

TRAINER_PATH = "vlm_dpo_plugins.adapters.swift.trainer.PluginDPOTrainer"
STOCK_TRAINER_PATH = "swift.rlhf_trainers.DPOTrainer"
WRAPPED_MARK = "__vlm_dpo_wrapped__"
logger = logging.getLogger("vlm_dpo_plugins.adapters.swift")


def activate() -> bool:
    """Point swift's DPO trainer at the plugin subclass; True when active. Calling it again changes nothing."""
    import swift
    from vlm_dpo_plugins.adapters.hf_trainer.console import configure_logging
    from vlm_dpo_plugins.adapters.swift.version import SUPPORTED_RANGE, is_supported

    configure_logging("[%(levelname)s:%(name)s] %(message)s")  # swift's own line format
    if not is_supported(swift.__version__):
        logger.warning(
            "vlm-dpo: ms-swift %s is outside the supported range %s; the adapter stays off and swift trains as it "
            "would without it (pip install 'ms-swift%s')",
            swift.__version__,
            SUPPORTED_RANGE,
            SUPPORTED_RANGE,
        )
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
    _wrap_prepare_model(SwiftRLHF)
    _wrap_get_dataset(SwiftRLHF)
    return True


def _wrap_prepare_model(pipeline: type) -> None:
    stock = pipeline.__dict__["prepare_model"]  # a classmethod object
    if getattr(stock.__func__, WRAPPED_MARK, False):
        return
    stock_function = stock.__func__

    @functools.wraps(stock_function)
    def prepare_model(cls: Any, args: Any, model: Any, *positional: Any, **kwargs: Any) -> Any:
        if getattr(args, "rlhf_type", None) == "dpo":
            from vlm_dpo_plugins.adapters.swift.workflow import prepare_run

            prepare_run(args)
        return stock_function(cls, args, model, *positional, **kwargs)

    setattr(prepare_model, WRAPPED_MARK, True)
    pipeline.prepare_model = classmethod(prepare_model)


def _wrap_get_dataset(pipeline: type) -> None:
    stock = pipeline.__dict__["_get_dataset"]
    if getattr(stock, WRAPPED_MARK, False):
        return

    @functools.wraps(stock)
    def _get_dataset(self: Any) -> Any:
        if getattr(self.args, "rlhf_type", None) != "dpo":
            return stock(self)
        from vlm_dpo_plugins.adapters.swift.data_checks import checked_loading
        from vlm_dpo_plugins.adapters.swift.workflow import plugin_config

        with checked_loading(self.args, plugin_config().collation):
            return stock(self)

    setattr(_get_dataset, WRAPPED_MARK, True)
    pipeline._get_dataset = _get_dataset
