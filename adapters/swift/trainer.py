"""``PluginDPOTrainer``: swift's ``DPOTrainer`` with every vlm-dpo-plugins hook in its loop.

Swift builds it from ``TRAINER_MAPPING['dpo']`` with its model, reference, template, collator and arguments
(reconciled by ``workflow.prepare_run``). What is swift's: its own ``--loss_type`` code on fp32 log-probs, its
lazily encoded dataset, its optimizer callbacks, its metric names (gathered over ranks) and ``logging.jsonl``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from swift.optimizers import OptimizerCallback
from swift.optimizers.multimodal import MultimodalOptimizerCallback
from swift.rlhf_trainers import DPOTrainer
from vlm_dpo_plugins.adapters.hf_trainer.log_line import FindingsOnLogLine
from vlm_dpo_plugins.adapters.hf_trainer.logits_trainer import LogitsTrainerMixin
from vlm_dpo_plugins.adapters.hf_trainer.plugin_trainer import requires_grad_kept
from vlm_dpo_plugins.adapters.hf_trainer.preference_step import StepResult
from vlm_dpo_plugins.adapters.hf_trainer.prescan import LazilyEncodedRows
from vlm_dpo_plugins.adapters.swift.workflow import take_run

from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.sharing.logits import response_logit_means
from vlm_dpo_plugins.types import Finding, Severity

logger = logging.getLogger("vlm_dpo_plugins.adapters.swift")
REPLACEABLE_OPTIMIZER_CALLBACKS = (OptimizerCallback, MultimodalOptimizerCallback)
"""Swift's optimizer callbacks that only build AdamW param groups (``--vit_lr/--aligner_lr`` picks the second)."""


class PluginDPOTrainer(LogitsTrainerMixin, DPOTrainer):
    # Swift's LoRA decides which adapters exist (its freeze flags, written from the policy, pick the targets);
    # every other parameter follows the policy, as swift's full-tuning freeze does with the same flags.
    framework_limits_every_parameter = False
    metrics_gathered = True

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

    @property
    def vlm_dpo_ignore_index(self) -> int:
        return self.label_pad_token_id

    def vlm_dpo_model_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in batch.items() if key != "text_position_ids"}

    def vlm_dpo_logit_means(self, step: StepResult) -> list[float]:
        # Swift's logits/* average, over response tokens and ranks, the mean logit that predicts each token.
        prepared = step.prepared
        means = response_logit_means(step.outputs, prepared.labels, prepared, step.pairs, self.label_pad_token_id)
        return [self.accelerator.gather_for_metrics(value).mean().item() for value in means]

    def vlm_dpo_reference_model(self, model: Any) -> tuple[Any, list[Any]]:
        return (model, [self.null_ref_context()]) if self.ref_model is None else (self.ref_model, [])


class SwiftRows(LazilyEncodedRows):
    """Swift's ``LazyLLMDataset``: on an encoder error it silently draws another row instead (``prescan.py``)."""

    encode_kwargs = {"return_length": True}

    def scannable(self) -> bool:
        from swift.dataset import LazyLLMDataset

        return isinstance(self.dataset, LazyLLMDataset)

    def raw_rows(self) -> Any:
        return self.dataset.dataset

    def encoder(self) -> Any:
        return self.dataset.encode_func

    def rebuilt(self, rows: Any, encode: Any) -> Any:
        from swift.dataset import LazyLLMDataset

        lazy = self.dataset
        return LazyLLMDataset(
            rows,
            encode,
            n_try_fetch=lazy.n_try_fetch,
            strict=lazy.strict,
            random_state=lazy.random_state,
            traceback_limit=lazy.traceback_limit,
        )

    def rejection(self, row: dict[str, Any], position: int, error: Exception) -> Finding:
        from swift.template import MaxLengthError

        # Swift shuffled the rows when it loaded them: the position is in its dataset, the question says which row.
        question = repr(str((row.get("messages") or [{}])[0].get("content", ""))[:60])
        if isinstance(error, MaxLengthError):
            code, message = "row-too-long", f"ms-swift deletes this row ({error}); question {question}"
            fix = "raise --max_length, or set --truncation_strategy left/right to truncate it instead"
        else:
            code = "collate-failed"
            message = f"ms-swift's template.encode raised on this row alone: {type(error).__name__}: {error}; "
            message += f"question {question}"
            fix = "fix the row (its messages, images and image tags must match the template) or drop it"
        return Finding(code, Severity.ERROR, message, fix, row=position, field="row", source="collation")
