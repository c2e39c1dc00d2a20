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

import contextlib
import dataclasses
import logging
from typing import Any

import torch
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.train.dpo.trainer import CustomDPOTrainer
from vlm_dpo_plugins.adapters.hf_trainer.plugin_trainer import PluginTrainerMixin, requires_grad_kept
from vlm_dpo_plugins.adapters.llamafactory.trainer_log import extend_trainer_log
from vlm_dpo_plugins.adapters.llamafactory.workflow import PluginRun

from vlm_dpo_plugins.freeze.report import trainable_report
from vlm_dpo_plugins.losses.compute import compute_preference_loss
from vlm_dpo_plugins.losses.corrupted_image import with_corrupted_chosen
from vlm_dpo_plugins.losses.logprobs import SequenceLogps
from vlm_dpo_plugins.sharing.forward import PreparedBatch
from vlm_dpo_plugins.sharing.logits import collated_sequence_logps, row_logit_means
from vlm_dpo_plugins.types import LossInputs, RunContext

logger = logging.getLogger("vlm_dpo_plugins.adapters.llamafactory")


class PluginDPOTrainer(PluginTrainerMixin, CustomDPOTrainer):
    # LLaMA-Factory decided what trains (its freeze flags, LoRA targets, freeze-tuning layers), with the flags
    # written from the policy: the policy narrows that set per step, never widens it.
    framework_limits_every_parameter = True

    def __init__(self, *args: Any, vlm_dpo_run: PluginRun, **kwargs: Any) -> None:
        self.plugins = vlm_dpo_run.plugins
        self.vlm_dpo_config = vlm_dpo_run.config
        self._vlm_dpo_run = vlm_dpo_run
        kwargs["train_dataset"] = _with_row_index(
            kwargs.get("train_dataset"), self.vlm_dpo_config, vlm_dpo_run.data.file_rows
        )
        super().__init__(*args, **kwargs)
        self.vlm_dpo_checked_files = vlm_dpo_run.data
        loss_type = self.vlm_dpo_config.loss.type
        self._loss_inputs: LossInputs = self.plugins.hook.vlm_dpo_loss_inputs(loss_type=loss_type) or LossInputs()
        self._needs_corrupted_image = not vlm_dpo_run.framework_computes_loss and bool(self._loss_inputs.extras)
        self._attach_plugins()
        self._set_up_sharing(
            usable=not (vlm_dpo_run.framework_computes_loss or self._needs_corrupted_image),
            reference_model=self.ref_model,
            reference_pass=self._loss_inputs.reference,
        )
        extend_trainer_log(self)
        self._announce()

    def _announce(self) -> None:
        run = self._vlm_dpo_run
        loss = "LLaMA-Factory's own" if run.framework_computes_loss else repr(self.vlm_dpo_config.loss.type)
        report = trainable_report(self._groups, self.model)
        trainable = ", ".join(
            f"{group} {int(numbers['trainable']):,}/{int(numbers['parameters']):,}" for group, numbers in report.items()
        )
        logger.info(
            "vlm-dpo: active in LLaMA-Factory's DPO trainer (settings from %s): loss %s, beta %s; trainable: %s",
            run.origin,
            loss,
            self.vlm_dpo_config.loss.beta,
            trainable,
        )

    def vlm_dpo_context(self) -> RunContext:
        return dataclasses.replace(self._vlm_dpo_run.context, model_type=getattr(self.model.config, "model_type", None))

    def _framework_trainable_hint(self, group: str) -> str:
        if self.finetuning_args.finetuning_type == "lora" and group == "projector":
            # LLaMA-Factory's LoRA never targets the projector; it trains it whole only as a PEFT modules_to_save.
            return "With LoRA, LLaMA-Factory trains the projector only through additional_target (PEFT modules_to_save)"
        return f"LLaMA-Factory's {self.finetuning_args.finetuning_type} tuning leaves the {group} group frozen"

    def _framework_optimizer_reason(self) -> str | None:
        args = self.finetuning_args
        for flag in ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon"):
            if getattr(args, flag, False):
                return f"LLaMA-Factory's {flag}"
        if getattr(args, "loraplus_lr_ratio", None) is not None:
            return "LLaMA-Factory's loraplus_lr_ratio"
        return None

    # -- loss --------------------------------------------------------------------

    def dpo_loss(self, *args: Any, loss_type: str | None = None, **kwargs: Any):
        """TRL's ``dpo_loss`` with LLaMA-Factory's ``pref_loss``, which its ``compute_preference_loss`` omits."""
        return super().dpo_loss(*args, loss_type=loss_type or self.loss_type, **kwargs)

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any):
        result = super().compute_loss(model, inputs, return_outputs, **kwargs)
        self._record_training_loss(result[0] if return_outputs else result)
        return result

    def get_batch_loss_metrics(self, model: Any, batch: dict[str, Any], train_eval: str = "train"):
        if self._vlm_dpo_run.framework_computes_loss:
            return super().get_batch_loss_metrics(model, batch, train_eval)
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        labels = batch["labels"]
        pairs = labels.shape[0] // 2
        if self._needs_corrupted_image:
            extended = with_corrupted_chosen({**inputs, "labels": labels}, batch_dims=_batch_dims(inputs))
            labels = extended.pop("labels")
            inputs = extended
        prepared = self._prepare_pairs(inputs, labels, labels != IGNORE_INDEX)
        with self._policy_pass(prepared):
            logits = model(**prepared.kwargs, return_dict=True, use_cache=False).logits
        policy = collated_sequence_logps(logits, prepared.labels, prepared, IGNORE_INDEX)
        reference = self._reference_logps(model, prepared) if self._loss_inputs.reference else None

        output, logps = compute_preference_loss(
            self.plugins,
            self.vlm_dpo_config,
            policy,
            reference,
            pairs=pairs,
            with_corrupted_image=self._needs_corrupted_image,
        )
        losses = output.losses
        if self.ftx_gamma > 1e-6:  # LLaMA-Factory's pref_ftx: an SFT term on the chosen responses, length-averaged
            losses = losses + self.ftx_gamma * -(logps.chosen / logps.chosen_token_count.clamp(min=1))
        logit_means = row_logit_means(logits, prepared, pairs)
        metrics = _framework_metrics(output, logps, logit_means, prefix="eval_" if train_eval == "eval" else "")
        return losses.mean(), metrics

    def _reference_logps(self, model: Any, prepared: PreparedBatch) -> SequenceLogps:
        if self.ref_model is None:
            reference_model = model
            # Leaving PEFT's disable_adapter re-marks the adapters trainable, the ones the policy froze included.
            contexts = [requires_grad_kept(model), self.accelerator.unwrap_model(model).disable_adapter()]
        else:
            reference_model, contexts = self.ref_model, []
        contexts.append(self._reference_pass(prepared, reference_model))
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            logits = reference_model(**prepared.kwargs, return_dict=True, use_cache=False).logits
            return collated_sequence_logps(logits, prepared.labels, prepared, IGNORE_INDEX)


def _batch_dims(inputs: dict[str, Any]) -> dict[str, int]:
    position_ids = inputs.get("position_ids")
    # Qwen2-VL's mrope positions from LLaMA-Factory's collator are [3, rows, length].
    return {"position_ids": 1} if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 3 else {}


def _framework_metrics(
    output: Any, logps: Any, logit_means: tuple[torch.Tensor, torch.Tensor], prefix: str
) -> dict[str, float]:
    """LLaMA-Factory's metric names and meanings (per-rank means; its ``log`` averages over ranks)."""
    chosen, rejected = output.chosen_rewards.detach().float(), output.rejected_rewards.detach().float()
    metrics = {
        f"{prefix}rewards/chosen": chosen.mean().item(),
        f"{prefix}rewards/rejected": rejected.mean().item(),
        f"{prefix}rewards/accuracies": (chosen > rejected).float().mean().item(),
        f"{prefix}rewards/margins": (chosen - rejected).mean().item(),
        f"{prefix}logps/chosen": logps.chosen.detach().float().mean().item(),
        f"{prefix}logps/rejected": logps.rejected.detach().float().mean().item(),
        f"{prefix}logits/chosen": logit_means[0].item(),
        f"{prefix}logits/rejected": logit_means[1].item(),
    }
    for name, value in output.metrics.items():
        if not name.startswith("rewards/"):
            metrics[f"{prefix}{name}"] = float(value)
    return metrics


def _with_row_index(dataset: Any, config: Any, file_rows: list[int] | None) -> Any:
    from datasets import Dataset

    key = config.collation.row_index_key
    if isinstance(dataset, Dataset) and key not in dataset.column_names:
        # Findings then name the row of the user's file, whatever order the sampler draws it in; when
        # LLaMA-Factory dropped rows of its own the file rows are unknown, and positions in its dataset stand in.
        known = file_rows is not None and len(file_rows) == len(dataset)
        return dataset.add_column(key, list(file_rows) if known else list(range(len(dataset))))
    return dataset
