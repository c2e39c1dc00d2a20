"""``PluginDPOTrainer``: swift's ``DPOTrainer`` with every vlm-dpo-plugins hook in its loop.

Swift builds it from ``TRAINER_MAPPING['dpo']`` with its model, reference, template, collator and arguments
(reconciled by ``workflow.prepare_run``). What is swift's: its own ``--loss_type`` code on fp32 log-probs, its
lazily encoded dataset, its optimizer callbacks, its metric names (gathered over ranks) and ``logging.jsonl``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from swift.optimizers import OptimizerCallback
from swift.optimizers.multimodal import MultimodalOptimizerCallback
from swift.rlhf_trainers import DPOTrainer
from vlm_dpo_plugins.adapters.hf_trainer.plugin_trainer import FindingsOnLogLine, PluginTrainerMixin, requires_grad_kept
from vlm_dpo_plugins.adapters.hf_trainer.preference_step import StepInputs
from vlm_dpo_plugins.adapters.hf_trainer.prescan import RowFactsEncoder, TrainingRows
from vlm_dpo_plugins.adapters.swift.workflow import take_run

from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.sharing.logits import response_logit_means
from vlm_dpo_plugins.types import Finding, Severity

logger = logging.getLogger("vlm_dpo_plugins.adapters.swift")
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
        self.vlm_dpo_bind(run)
        super().__init__(*args, **kwargs)
        self.vlm_dpo_attach(framework_computes_loss=run.framework_computes_loss)
        # First in line, so the findings are on the dict before swift's callbacks write it to logging.jsonl.
        self.callback_handler.callbacks.insert(0, FindingsOnLogLine(self))
        loss = f"swift's --loss_type {self.loss_type}" if run.framework_computes_loss else repr(run.config.loss.type)
        self.announce("swift", run.origin, loss)

    def vlm_dpo_training_rows(self) -> SwiftRows:
        return SwiftRows(self.train_dataset, self._row_index_key())

    # -- optimizer ---------------------------------------------------------------------

    def vlm_dpo_framework_optimizer(self) -> str | None:
        if type(self.optimizer_callback) not in REPLACEABLE_OPTIMIZER_CALLBACKS:
            return f"swift's --optimizer {self.args.optimizer}"
        return None

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        reason = self.vlm_dpo_framework_optimizer()
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

    def get_per_token_logps(self, logits: torch.Tensor, labels: torch.Tensor, label_pad_token_id=-100, **kwargs):
        """Swift's per-token log-probs, from fp32 logits one row at a time (bf16 log-softmax loses DPO's margins)."""
        if (
            self.vlm_dpo_config.section("loss") is None
            or not self.vlm_dpo_config.loss.fp32_logps
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
        without_text_positions = {key: value for key, value in batch.items() if key != "text_position_ids"}
        gather = self.accelerator.gather_for_metrics
        return self.logits_loss(
            model,
            without_text_positions,
            train_eval,
            # Swift's logits/* average, over response tokens and ranks, the mean logit that predicts each token.
            logit_means=lambda step: [
                gather(value).mean().item()
                for value in response_logit_means(
                    step.outputs, step.prepared.labels, step.prepared, step.pairs, self.label_pad_token_id
                )
            ],
            gather=gather,
        )

    def vlm_dpo_step_inputs(self, batch: dict[str, Any]) -> StepInputs:
        return self.logits_step_inputs(batch, self.label_pad_token_id)

    def vlm_dpo_reference_model(self, model: Any) -> tuple[Any, list[Any]]:
        return (model, [self.null_ref_context()]) if self.ref_model is None else (self.ref_model, [])


class SwiftRows(TrainingRows):
    """Swift's ``LazyLLMDataset`` encodes each row when drawn, and on an error silently draws another row instead:
    the pre-scan encodes every row once, and a row the encoder rejects is a finding, left out like the others."""

    def scannable(self) -> bool:
        from swift.dataset import LazyLLMDataset

        return isinstance(self.dataset, LazyLLMDataset)

    def examples(self) -> Iterator[dict[str, Any]]:
        from swift.template import MaxLengthError

        lazy = self.dataset
        encode = RowFactsEncoder(lazy.encode_func, self.row_index_key)
        for position in range(len(lazy.dataset)):
            row = lazy.dataset[position]
            try:
                encoded = encode(row, return_length=True)
            except MaxLengthError as error:
                self.read_findings.append(_encode_finding("row-too-long", row, position, error))
                continue
            except Exception as error:
                self.read_findings.append(_encode_finding("collate-failed", row, position, error))
                continue
            yield {**encoded, self.row_index_key: position}

    def row_indices(self) -> list[int] | None:
        return None

    def kept(self, skipped: list[int]) -> Any:
        # Rebuilt even when nothing was left out: the rows then carry their position into every batch.
        return self.select(self.positions_kept(skipped))

    def select(self, positions: list[int]) -> Any:
        from swift.dataset import LazyLLMDataset

        lazy = self.dataset
        rows = lazy.dataset.select(positions)
        if self.row_index_key is not None:
            # Swift 4.6 drops columns it does not know when it loads rows; should one of this name survive, the
            # positions replace it (the pre-scan named rows by position too) rather than add_column failing.
            if self.row_index_key in rows.column_names:
                rows = rows.remove_columns(self.row_index_key)
            rows = rows.add_column(self.row_index_key, positions)
        return LazyLLMDataset(
            rows,
            RowFactsEncoder(lazy.encode_func, self.row_index_key),
            n_try_fetch=lazy.n_try_fetch,
            strict=lazy.strict,
            random_state=lazy.random_state,
            traceback_limit=lazy.traceback_limit,
        )


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
