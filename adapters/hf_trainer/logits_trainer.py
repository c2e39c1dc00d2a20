"""``LogitsTrainerMixin``: the shared step in a framework whose DPO trainer computes the loss in
``get_batch_loss_metrics(model, batch, train_eval)`` on a model that returns logits (LLaMA-Factory, ms-swift).

Its batches are 2B rows (chosen, then rejected) with ``labels`` at the framework's ignore index outside the
responses. The adapter says only what its framework names differently: the ignore index, whether the metrics
are averaged over ranks here or by the framework's own ``log``, its ``logits/chosen``/``logits/rejected``, and any
term of its own added to the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from vlm_dpo_plugins.adapters.hf_trainer.plugin_trainer import PluginTrainerMixin
from vlm_dpo_plugins.adapters.hf_trainer.preference_step import StepInputs, StepResult, preference_metrics

from vlm_dpo_plugins.losses.logprobs import SequenceLogps
from vlm_dpo_plugins.sharing.forward import PreparedBatch
from vlm_dpo_plugins.sharing.logits import collated_sequence_logps


class LogitsTrainerMixin(PluginTrainerMixin):
    vlm_dpo_ignore_index: int = -100
    """The label of every position outside the responses."""
    metrics_gathered = False
    """True: the step's metrics are averaged over ranks here (ms-swift); False: the framework's ``log`` averages
    what each rank logs (LLaMA-Factory)."""

    def vlm_dpo_logit_means(self, step: StepResult) -> Sequence[float]:
        """The framework's own ``logits/chosen`` and ``logits/rejected`` of a step."""
        raise NotImplementedError(f"{type(self).__name__} must say how its framework averages the logits it logs")

    def vlm_dpo_losses(self, step: StepResult) -> torch.Tensor:
        """The per-pair losses, with any term of the framework's own added."""
        return step.output.losses

    def vlm_dpo_model_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The collated batch without what the framework's collator adds for its own loss only."""
        return batch

    def vlm_dpo_step_inputs(self, batch: dict[str, Any]) -> StepInputs:
        extended = self.vlm_dpo_step.extend(batch)
        labels, ignore_index = extended["labels"], self.vlm_dpo_ignore_index
        return StepInputs(
            {key: value for key, value in extended.items() if key != "labels"},
            labels,
            labels != ignore_index,
            extended,
            pairs=batch["labels"].shape[0] // 2,
            forward=lambda model, prepared, _: logits_forward(model, prepared, ignore_index),
        )

    def get_batch_loss_metrics(self, model: Any, batch: dict[str, Any], train_eval: str = "train", **kwargs: Any):
        """The loss and the metrics, under the framework's names (``rewards/*``, ``logps/*``, the variant's terms,
        ``logits/*``), unless the framework computes its own loss."""
        if self._vlm_dpo_run.framework_computes_loss:
            return super().get_batch_loss_metrics(model, batch, train_eval, **kwargs)
        step = self.vlm_dpo_run_step(model, self.vlm_dpo_model_batch(batch))
        gather = self.accelerator.gather_for_metrics if self.metrics_gathered else None
        metrics = preference_metrics(step.output, step.logps, gather)
        metrics.update(zip(("logits/chosen", "logits/rejected"), self.vlm_dpo_logit_means(step)))
        self.vlm_dpo_loss_terms.update(name for name in step.output.metrics if not name.startswith("rewards/"))
        prefix = "eval_" if train_eval == "eval" else ""
        return self.vlm_dpo_losses(step).mean(), {f"{prefix}{name}": value for name, value in metrics.items()}


def logits_forward(model: Any, prepared: PreparedBatch, ignore_index: int) -> tuple[SequenceLogps, torch.Tensor]:
    """The collated rows' summed fp32 log-probs (labels outside the responses are ``ignore_index``), and the
    logits."""
    logits = model(**prepared.kwargs, return_dict=True, use_cache=False).logits
    length = prepared.labels.shape[1]
    if logits.shape[1] != length:
        # Some models return logits for image tokens placed before the text; the text's are the last positions.
        logits = logits[:, -length:]
    return collated_sequence_logps(logits, prepared.labels, prepared, ignore_index), logits
