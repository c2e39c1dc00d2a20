"""``PluginDPOTrainer``: LLaMA-Factory's ``CustomDPOTrainer`` with every vlm-dpo-plugins hook in its loop.

Built by LLaMA-Factory's own ``run_dpo`` (``workflow.py`` puts it where that function imports
the trainer from), with LLaMA-Factory's model, reference model, collator and arguments.
Beyond what ``PluginTrainerMixin`` wires (freeze policy, per-group optimizer, guarded step,
collation checks, metrics, detectors, checkpoint state):

- the loss: LLaMA-Factory's batch (chosen rows, then rejected rows, labels -100 outside the
  responses) through one policy forward and one reference forward, summed fp32 log-probs
  of the response tokens computed chunk by chunk, then ``vlm_dpo_compute_loss``: every
  registry variant, mDPO's corrupted-image rows in the same forward. LLaMA-Factory's
  metric names are kept. For a loss only LLaMA-Factory has, its own code runs, with
  ``dpo_loss`` given the loss type it forgets to pass (trl >= 0.20 then computes sigmoid
  for ``pref_loss: hinge/ipo``);
- ``trainer_log.jsonl``: LLaMA-Factory's ``LogCallback`` writes a fixed set of keys; the
  plugins' metrics and findings are added to its lines (``trainer_log.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.train.dpo.trainer import CustomDPOTrainer
from vlm_dpo_plugins.adapters.hf_trainer.plugin_trainer import PluginTrainerMixin, requires_grad_kept, with_row_index
from vlm_dpo_plugins.adapters.hf_trainer.preference_step import preference_metrics
from vlm_dpo_plugins.adapters.hf_trainer.run import PluginRun
from vlm_dpo_plugins.adapters.llamafactory.trainer_log import extend_trainer_log

from vlm_dpo_plugins.sharing.logits import row_logit_means

logger = logging.getLogger("vlm_dpo_plugins.adapters.llamafactory")
OPTIMIZER_FLAGS = ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon")
"""LLaMA-Factory options that build an optimizer of their own (per-group learning rates then do not apply)."""


class PluginDPOTrainer(PluginTrainerMixin, CustomDPOTrainer):
    # LLaMA-Factory decided what trains (its freeze flags, LoRA targets, freeze-tuning layers), with the flags
    # written from the policy: the policy narrows that set per step, never widens it.
    framework_limits_every_parameter = True

    def __init__(self, *args: Any, vlm_dpo_run: PluginRun, **kwargs: Any) -> None:
        self.plugins = vlm_dpo_run.plugins
        self.vlm_dpo_config = vlm_dpo_run.config
        self._vlm_dpo_run = vlm_dpo_run
        checked = vlm_dpo_run.checked_files
        # Findings name the row of the user's file; when LLaMA-Factory dropped rows of its own, positions stand in.
        kwargs["train_dataset"] = with_row_index(
            kwargs.get("train_dataset"), self._row_index_key(), checked and checked.file_rows
        )
        super().__init__(*args, **kwargs)
        self.vlm_dpo_checked_files = checked
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
        step = self.logits_step(model, batch, IGNORE_INDEX)
        losses, logps = step.output.losses, step.logps
        if self.ftx_gamma > 1e-6:  # LLaMA-Factory's pref_ftx: an SFT term on the chosen responses, length-averaged
            losses = losses + self.ftx_gamma * -(logps.chosen / logps.chosen_token_count.clamp(min=1))
        # Per-rank means: LLaMA-Factory's ``log`` averages them over ranks.
        metrics = preference_metrics(step.output, logps)
        chosen_logits, rejected_logits = row_logit_means(step.outputs, step.prepared, step.pairs)
        metrics.update({"logits/chosen": chosen_logits.item(), "logits/rejected": rejected_logits.item()})
        prefix = "eval_" if train_eval == "eval" else ""
        return losses.mean(), {f"{prefix}{name}": value for name, value in metrics.items()}

    def vlm_dpo_reference_model(self, model: Any) -> tuple[Any, list[Any]]:
        if self.ref_model is not None:
            return self.ref_model, []
        # Leaving PEFT's disable_adapter re-marks the adapters trainable, the ones the policy froze included.
        return model, [requires_grad_kept(model), self.accelerator.unwrap_model(model).disable_adapter()]
