"""``PluginDPOTrainer``: LLaMA-Factory's ``CustomDPOTrainer`` with every vlm-dpo-plugins hook in its loop.

Built by LLaMA-Factory's own ``run_dpo`` (``workflow.py``) with its model, reference, collator and arguments.
What is LLaMA-Factory's: its batch (chosen rows, then rejected, labels ``IGNORE_INDEX`` outside the responses),
its ``pref_ftx`` term, its metric names (per-rank: its ``log`` averages them) and its ``trainer_log.jsonl``.
"""

from __future__ import annotations

from typing import Any

import torch
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.train.callbacks import LogCallback
from llamafactory.train.dpo.trainer import CustomDPOTrainer
from vlm_dpo_plugins.adapters.hf_trainer.log_line import extend_log_writer
from vlm_dpo_plugins.adapters.hf_trainer.logits_trainer import LogitsTrainerMixin
from vlm_dpo_plugins.adapters.hf_trainer.plugin_trainer import with_row_index
from vlm_dpo_plugins.adapters.hf_trainer.preference_step import StepResult
from vlm_dpo_plugins.adapters.hf_trainer.run import PluginRun

from vlm_dpo_plugins.sharing.logits import row_logit_means

OPTIMIZER_FLAGS = ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon")
"""LLaMA-Factory options that build an optimizer of their own (per-group learning rates then do not apply)."""


class PluginDPOTrainer(LogitsTrainerMixin, CustomDPOTrainer):
    # LLaMA-Factory decided what trains (its freeze flags, LoRA targets, freeze-tuning layers), with the flags
    # written from the policy: the policy narrows that set per step, never widens it.
    framework_limits_every_parameter = True
    vlm_dpo_ignore_index = IGNORE_INDEX

    def __init__(self, *args: Any, vlm_dpo_run: PluginRun, **kwargs: Any) -> None:
        self.vlm_dpo_bind(vlm_dpo_run)
        checked = vlm_dpo_run.checked_files
        # Findings name the row of the user's file; when LLaMA-Factory dropped rows of its own, positions stand in.
        kwargs["train_dataset"] = with_row_index(
            kwargs.get("train_dataset"), self._row_index_key(), checked and checked.file_rows
        )
        super().__init__(*args, **kwargs)
        self.vlm_dpo_attach(framework_computes_loss=vlm_dpo_run.framework_computes_loss)
        extend_log_writer(self, LogCallback, "_write_log")  # its trainer_log.jsonl line
        loss = "LLaMA-Factory's own" if vlm_dpo_run.framework_computes_loss else repr(self.vlm_dpo_config.loss.type)
        self.announce("LLaMA-Factory", vlm_dpo_run.origin, loss)

    def vlm_dpo_frozen_group_hint(self, group: str) -> str:
        if self.finetuning_args.finetuning_type == "lora" and group == "projector":
            # LLaMA-Factory's LoRA never targets the projector; it trains it whole only as a PEFT modules_to_save.
            return "With LoRA, LLaMA-Factory trains the projector only through additional_target (PEFT modules_to_save)"
        return f"LLaMA-Factory's {self.finetuning_args.finetuning_type} tuning leaves the {group} group frozen"

    def vlm_dpo_framework_optimizer(self) -> str | None:
        for flag in OPTIMIZER_FLAGS:
            if getattr(self.finetuning_args, flag, False):
                return f"LLaMA-Factory's {flag}"
        if getattr(self.finetuning_args, "loraplus_lr_ratio", None) is not None:
            return "LLaMA-Factory's loraplus_lr_ratio"
        return None

    # -- loss --------------------------------------------------------------------

    def dpo_loss(self, *args: Any, loss_type: str | None = None, **kwargs: Any):
        """TRL's ``dpo_loss`` with LLaMA-Factory's ``pref_loss``, which its ``compute_preference_loss`` omits."""
        return super().dpo_loss(*args, loss_type=loss_type or self.loss_type, **kwargs)

    def vlm_dpo_logit_means(self, step: StepResult) -> list[float]:
        return [value.item() for value in row_logit_means(step.outputs, step.prepared, step.pairs)]

    def vlm_dpo_losses(self, step: StepResult) -> torch.Tensor:
        """LLaMA-Factory's ``pref_ftx``: an SFT term on the chosen responses, length-averaged."""
        if self.ftx_gamma <= 1e-6:
            return step.output.losses
        logps = step.logps
        return step.output.losses + self.ftx_gamma * -(logps.chosen / logps.chosen_token_count.clamp(min=1))

