"""``PluginDPOTrainer``: LLaMA-Factory's ``CustomDPOTrainer`` with every vlm-dpo-plugins hook in its loop.

Built by LLaMA-Factory's own ``run_dpo`` (``workflow.py``) with its model, reference, collator and arguments.
What is LLaMA-Factory's: its batch (chosen rows, then rejected, labels ``IGNORE_INDEX`` outside the responses),
its ``pref_ftx`` term, its metric names (per-rank: its ``log`` averages them) and its ``trainer_log.jsonl``.
"""

from __future__ import annotations

from typing import Any

import torch
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.train.dpo.trainer import CustomDPOTrainer
from vlm_dpo_plugins.adapters.hf_trainer.plugin_trainer import PluginTrainerMixin, with_row_index
from vlm_dpo_plugins.adapters.hf_trainer.preference_step import StepInputs, StepResult
from vlm_dpo_plugins.adapters.hf_trainer.run import PluginRun
from vlm_dpo_plugins.adapters.llamafactory.trainer_log import extend_trainer_log

from vlm_dpo_plugins.sharing.logits import row_logit_means

OPTIMIZER_FLAGS = ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon")
"""LLaMA-Factory options that build an optimizer of their own (per-group learning rates then do not apply)."""


class PluginDPOTrainer(PluginTrainerMixin, CustomDPOTrainer):
    # LLaMA-Factory decided what trains (its freeze flags, LoRA targets, freeze-tuning layers), with the flags
    # written from the policy: the policy narrows that set per step, never widens it.
    framework_limits_every_parameter = True

    def __init__(self, *args: Any, vlm_dpo_run: PluginRun, **kwargs: Any) -> None:
        self.vlm_dpo_bind(vlm_dpo_run)
        checked = vlm_dpo_run.checked_files
        # Findings name the row of the user's file; when LLaMA-Factory dropped rows of its own, positions stand in.
        kwargs["train_dataset"] = with_row_index(
            kwargs.get("train_dataset"), self._row_index_key(), checked and checked.file_rows
        )
        super().__init__(*args, **kwargs)
        self.vlm_dpo_attach(framework_computes_loss=vlm_dpo_run.framework_computes_loss)
        extend_trainer_log(self)
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

    def get_batch_loss_metrics(self, model: Any, batch: dict[str, Any], train_eval: str = "train"):
        if self._vlm_dpo_run.framework_computes_loss:
            return super().get_batch_loss_metrics(model, batch, train_eval)
        return self.logits_loss(model, batch, train_eval, logit_means=_row_logit_means, losses=self._with_sft_term)

    def vlm_dpo_step_inputs(self, batch: dict[str, Any]) -> StepInputs:
        return self.logits_step_inputs(batch, IGNORE_INDEX)

    def _with_sft_term(self, step: StepResult) -> torch.Tensor:
        """LLaMA-Factory's ``pref_ftx``: an SFT term on the chosen responses, length-averaged."""
        if self.ftx_gamma <= 1e-6:
            return step.output.losses
        logps = step.logps
        return step.output.losses + self.ftx_gamma * -(logps.chosen / logps.chosen_token_count.clamp(min=1))


def _row_logit_means(step: StepResult) -> list[float]:
    return [value.item() for value in row_logit_means(step.outputs, step.prepared, step.pairs)]
