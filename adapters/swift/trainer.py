"""``PluginDPOTrainer``: swift's ``DPOTrainer`` with every vlm-dpo-plugins hook in its loop.

Swift builds it from ``TRAINER_MAPPING['dpo']`` with its own model, reference model,
template, collator and arguments (already reconciled by ``workflow.prepare_run``). Beyond
what ``PluginTrainerMixin`` wires (freeze policy, per-group optimizer, guarded step,
collation checks, metrics, detectors, checkpoint state):

- the loss: swift's own ``--loss_type`` code, with the per-token log-probs computed in fp32
  one row at a time; or, when the plugin config chose ``loss.type``, the registry's variant on
  fp32 chunked log-probs of swift's batch (chosen rows, then rejected rows), mDPO's
  corrupted-image rows in the same forward. Swift's metric names are kept;
- the reference pass through a disabled LoRA adapter leaves every ``requires_grad`` as it was;
- the optimizer: swift builds it through an "optimizer callback"; the default and the
  ``--vit_lr/--aligner_lr`` one are replaced by the freeze policy's per-group optimizer;
- findings go onto the line swift appends to ``logging.jsonl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from swift.optimizers import OptimizerCallback
from swift.optimizers.multimodal import MultimodalOptimizerCallback
from swift.rlhf_trainers import DPOTrainer
from transformers import TrainerCallback
from vlm_dpo_plugins.adapters.hf_trainer.plugin_trainer import PluginTrainerMixin, requires_grad_kept
from vlm_dpo_plugins.adapters.swift.workflow import take_run

from vlm_dpo_plugins.collation.policy import decide
from vlm_dpo_plugins.collation.report import CollationSummary
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.freeze.report import trainable_report
from vlm_dpo_plugins.losses.compute import compute_preference_loss
from vlm_dpo_plugins.losses.corrupted_image import with_corrupted_chosen
from vlm_dpo_plugins.losses.logprobs import SequenceLogps
from vlm_dpo_plugins.sharing.forward import PreparedBatch
from vlm_dpo_plugins.sharing.logits import collated_sequence_logps, response_logit_means
from vlm_dpo_plugins.types import Finding, LossInputs, RunContext, Severity

logger = logging.getLogger("vlm_dpo_plugins.adapters.swift")
FINDINGS_KEY = "vlm_dpo_findings"
REPLACEABLE_OPTIMIZER_CALLBACKS = (OptimizerCallback, MultimodalOptimizerCallback)
"""Swift's optimizer callbacks that only build AdamW param groups (``--vit_lr/--aligner_lr`` picks the second)."""


class PluginDPOTrainer(PluginTrainerMixin, DPOTrainer):
    # Swift's LoRA decides which adapters exist (its freeze flags, written from the policy, pick the targets);
    # every other parameter follows the policy, as swift's full-tuning freeze does with the same flags.
    framework_limits_every_parameter = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        run = take_run(kwargs.get("args"))
        if run is None:
            raise ConfigError(
                "PluginDPOTrainer is built by swift's rlhf pipeline after the plugin prepared the run: start it with "
                '`swift rlhf --rlhf_type dpo ... --external_plugins "$(vlm-dpo swift-plugin)"`'
            )
        self.plugins = run.plugins
        self.vlm_dpo_config = run.config
        self._vlm_dpo_run = run
        self.vlm_dpo_checked_files = run.checked_files
        self._encode_findings: list[Finding] = []
        super().__init__(*args, **kwargs)
        loss_type = self.vlm_dpo_config.loss.type
        self._loss_inputs: LossInputs = self.plugins.hook.vlm_dpo_loss_inputs(loss_type=loss_type) or LossInputs()
        self._needs_corrupted_image = not run.framework_computes_loss and bool(self._loss_inputs.extras)
        self._attach_plugins()
        self._set_up_sharing(
            usable=not (run.framework_computes_loss or self._needs_corrupted_image),
            reference_model=self.ref_model,
            reference_pass=self._loss_inputs.reference,
        )
        # First in line, so the findings are on the dict before swift's callbacks write it to logging.jsonl.
        self.callback_handler.callbacks.insert(0, FindingsOnLogLine(self))
        self._announce()

    def _announce(self) -> None:
        run = self._vlm_dpo_run
        loss = f"swift's --loss_type {self.loss_type}" if run.framework_computes_loss else repr(run.config.loss.type)
        report = trainable_report(self._groups, self.model)
        trainable = ", ".join(
            f"{group} {int(numbers['trainable']):,}/{int(numbers['parameters']):,}" for group, numbers in report.items()
        )
        logger.info(
            "vlm-dpo: active in swift's DPO trainer (settings from %s): loss %s, beta %s; trainable: %s",
            run.origin,
            loss,
            run.config.loss.beta,
            trainable,
        )

    # -- pre-scan: swift's LazyLLMDataset encodes each row when drawn, and on an error draws another row instead --

    def _can_prescan(self) -> bool:
        from swift.dataset import LazyLLMDataset

        return isinstance(self.train_dataset, LazyLLMDataset)

    def _prescan_examples(self) -> Iterator[dict[str, Any]]:
        from swift.template import MaxLengthError

        lazy, key = self.train_dataset, self.vlm_dpo_config.collation.row_index_key
        for position in range(len(lazy.dataset)):
            row = lazy.dataset[position]
            try:
                encoded = lazy.encode_func(row, return_length=True)
            except MaxLengthError as error:
                self._encode_findings.append(_encode_finding("row-too-long", row, position, error))
                continue
            except Exception as error:
                self._encode_findings.append(_encode_finding("collate-failed", row, position, error))
                continue
            yield {**encoded, key: position}

    def _prescan_row_indices(self) -> list[int] | None:
        return None

    def _add_prescan_findings(self, summary: CollationSummary) -> None:
        decided = [decide(finding, self.vlm_dpo_config.collation) for finding in self._encode_findings]
        summary.add(decided, 0)
        collation = self.plugins.get_plugin("collation")
        if collation is not None and summary.report_path:
            collation.report.write(decided, Path(summary.report_path), "scan")

    def _select_rows(self, positions: list[int]) -> Any:
        from swift.dataset import LazyLLMDataset

        lazy = self.train_dataset
        return LazyLLMDataset(
            lazy.dataset.select(positions),
            lazy.encode_func,
            n_try_fetch=lazy.n_try_fetch,
            strict=lazy.strict,
            random_state=lazy.random_state,
            traceback_limit=lazy.traceback_limit,
        )

    def vlm_dpo_context(self) -> RunContext:
        return dataclasses.replace(self._vlm_dpo_run.context, model_type=getattr(self.model.config, "model_type", None))

    # -- optimizer ---------------------------------------------------------------------

    def _framework_optimizer_reason(self) -> str | None:
        if type(self.optimizer_callback) not in REPLACEABLE_OPTIMIZER_CALLBACKS:
            return f"swift's --optimizer {self.args.optimizer}"
        return None

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        reason = self._framework_optimizer_reason()
        if reason is not None:
            logger.warning("vlm-dpo: %s builds the optimizer; freeze.learning_rates do not apply in this run", reason)
            return super().create_optimizer_and_scheduler(num_training_steps)
        # Swift's version asks its optimizer callback, which calls transformers' create_optimizer directly.
        self.create_optimizer()
        self.create_scheduler(num_training_steps, self.optimizer)

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        self._optimizer_ori = optimizer  # swift's create_scheduler falls back to it
        return optimizer

    # -- loss --------------------------------------------------------------------------

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._record_training_loss(result[0] if return_outputs else result)
        return result

    def get_per_token_logps(self, logits: torch.Tensor, labels: torch.Tensor, label_pad_token_id=-100, **kwargs):
        """Swift's per-token log-probs, from fp32 logits one row at a time (bf16 log-softmax loses DPO's margins)."""
        if (
            not self.vlm_dpo_config.loss.fp32_logps
            or logits.dtype == torch.float32
            or self.template.sequence_parallel_size != 1
        ):
            return super().get_per_token_logps(logits, labels, label_pad_token_id, **kwargs)
        rows = [
            super(PluginDPOTrainer, self).get_per_token_logps(
                logits[row : row + 1].float(), labels[row : row + 1], label_pad_token_id, **kwargs
            )
            for row in range(logits.shape[0])
        ]
        return tuple(torch.cat(parts) for parts in zip(*rows))

    @contextlib.contextmanager
    def null_ref_context(self):
        # Leaving PEFT's disable_adapter re-marks the adapters trainable, the ones the policy froze included.
        with requires_grad_kept(self.model), super().null_ref_context():
            yield

    def get_batch_loss_metrics(self, model: Any, batch: dict[str, Any], train_eval: str = "train", **kwargs: Any):
        if self._vlm_dpo_run.framework_computes_loss:
            return super().get_batch_loss_metrics(model, batch, train_eval, **kwargs)
        inputs = {key: value for key, value in batch.items() if key not in ("labels", "text_position_ids")}
        labels = batch["labels"]
        pairs = labels.shape[0] // 2
        if self._needs_corrupted_image:
            extended = with_corrupted_chosen({**inputs, "labels": labels}, batch_dims=_batch_dims(inputs))
            labels = extended.pop("labels")
            inputs = extended
        prepared = self._prepare_pairs(inputs, labels, labels != self.label_pad_token_id)
        with self._policy_pass(prepared):
            logits = _response_aligned(model(**prepared.kwargs, use_cache=False).logits, prepared.labels)
        policy = collated_sequence_logps(logits, prepared.labels, prepared, self.label_pad_token_id)
        reference = self._reference_logps(model, prepared) if self._loss_inputs.reference else None
        output, logps = compute_preference_loss(
            self.plugins,
            self.vlm_dpo_config,
            policy,
            reference,
            pairs=pairs,
            with_corrupted_image=self._needs_corrupted_image,
        )
        logit_means = response_logit_means(logits, prepared.labels, prepared, pairs, self.label_pad_token_id)
        metrics = self._swift_metrics(output, logps, logit_means, train_eval)
        return output.losses.mean(), metrics

    def _reference_logps(self, model: Any, prepared: PreparedBatch) -> SequenceLogps:
        reference_model, context = (
            (model, self.null_ref_context()) if self.ref_model is None else (self.ref_model, None)
        )
        shared = self._reference_pass(prepared, reference_model)
        with torch.no_grad(), context or contextlib.nullcontext(), shared:
            logits = _response_aligned(reference_model(**prepared.kwargs, use_cache=False).logits, prepared.labels)
            return collated_sequence_logps(logits, prepared.labels, prepared, self.label_pad_token_id)

    def _swift_metrics(
        self, output: Any, logps: Any, logit_means: tuple[torch.Tensor, torch.Tensor], train_eval: str
    ) -> dict[str, float]:
        """Swift's metric names, gathered over ranks as swift gathers its own."""
        prefix = "eval_" if train_eval == "eval" else ""
        gather = self.accelerator.gather_for_metrics
        chosen, rejected = output.chosen_rewards.detach().float(), output.rejected_rewards.detach().float()
        # Swift's logits/* are the mean over response tokens of each token's mean logit.
        metrics = {
            f"{prefix}rewards/chosen": gather(chosen).mean().item(),
            f"{prefix}rewards/rejected": gather(rejected).mean().item(),
            f"{prefix}rewards/accuracies": gather((chosen > rejected).float()).mean().item(),
            f"{prefix}rewards/margins": gather(chosen - rejected).mean().item(),
            f"{prefix}logps/chosen": gather(logps.chosen.detach().float()).mean().item(),
            f"{prefix}logps/rejected": gather(logps.rejected.detach().float()).mean().item(),
            f"{prefix}logits/chosen": gather(logit_means[0]).mean().item(),
            f"{prefix}logits/rejected": gather(logit_means[1]).mean().item(),
        }
        for name, value in output.metrics.items():
            if not name.startswith("rewards/"):
                metrics[f"{prefix}{name}"] = float(value)
        return metrics


class FindingsOnLogLine(TrainerCallback):
    """Runs the detectors on each logged dict before swift's callbacks append it to ``logging.jsonl``."""

    def __init__(self, trainer: PluginDPOTrainer) -> None:
        self.trainer = trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            findings = self.trainer.run_detectors(logs)
            if findings:
                logs[FINDINGS_KEY] = [str(finding) for finding in findings]


def _response_aligned(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Some models return logits for image tokens placed before the text; swift keeps the last positions too.
    return logits[:, -labels.shape[1] :] if logits.shape[1] != labels.shape[1] else logits


def _batch_dims(inputs: dict[str, Any]) -> dict[str, int]:
    position_ids = inputs.get("position_ids")
    # Qwen2-VL's mrope positions from swift's template are [3, rows, length].
    return {"position_ids": 1} if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 3 else {}


def _encode_finding(code: str, row: dict[str, Any], position: int, error: Exception) -> Finding:
    # Swift shuffled the rows when it loaded them: the position is in its dataset, the question says which row.
    messages = row.get("messages") or [{}]
    question = str(messages[0].get("content", ""))[:60]
    if code == "row-too-long":
        message = f"ms-swift deletes this row ({error}); question {question!r}"
        fix = "raise --max_length, or set --truncation_strategy left/right to truncate it instead"
    else:
        message = f"ms-swift's template.encode raised on this row alone: {type(error).__name__}: {error}; question "
        message += repr(question)
        fix = "fix the row (its messages, images and image tags must match the template) or drop it"
    return Finding(code, Severity.ERROR, message, fix, row=position, field="row", source="collation")
