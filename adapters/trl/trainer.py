"""``VLMDPOTrainer``: TRL's ``DPOTrainer`` with every vlm-dpo-plugins hook inside its own training loop.

    trainer = VLMDPOTrainer(model=model, args=dpo_config, train_dataset=dataset,
                            processing_class=processor, vlm_dpo_config="plugins.yaml")

Same arguments as ``trl.DPOTrainer`` plus ``vlm_dpo_config`` (a ``VLMDPOConfig``, a dict or a YAML path) and
``plugin_manager``. The shared step (``hf_trainer.PluginTrainerMixin``) does the rest; this class adds what is
TRL's: its ``DPOConfig`` (reconciled and planned before TRL reads it), its PEFT config, its fused-LM-head batch,
its metrics and its checkpoint layout (docs/trl.md).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

import torch
import trl
from accelerate.utils import is_peft_model
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter
from vlm_dpo_plugins.adapters.hf_trainer.plugin_trainer import PluginTrainerMixin, requires_grad_kept, with_row_index
from vlm_dpo_plugins.adapters.hf_trainer.preference_step import StepInputs, preference_metrics
from vlm_dpo_plugins.adapters.hf_trainer.run import run_context, start_run
from vlm_dpo_plugins.adapters.hf_trainer.settings import framework_max_grad_norm
from vlm_dpo_plugins.adapters.hf_trainer.trainable import lora_targets_from_policy
from vlm_dpo_plugins.adapters.trl.batch import collated_outputs, completion_labels, model_inputs, summed_logps
from vlm_dpo_plugins.adapters.trl.metrics import record_token_metrics
from vlm_dpo_plugins.adapters.trl.settings import reconcile
from vlm_dpo_plugins.adapters.trl.sharded_head import head_unsharded

from vlm_dpo_plugins.collation.cross_attention import FullLengthCrossAttention
from vlm_dpo_plugins.collation.prefix_lm import ResponsesAsSuffix, is_prefix_lm_processor
from vlm_dpo_plugins.collation.response_bos import ResponsesWithoutBos
from vlm_dpo_plugins.config_source import PluginSource, load_plugin_config
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.sharing.forward import PreparedBatch
from vlm_dpo_plugins.types import RunContext


_TRL_SIGNATURE = inspect.signature(trl.DPOTrainer.__init__)


class VLMDPOTrainer(PluginTrainerMixin, trl.DPOTrainer):
    def __init__(self, *args: Any, vlm_dpo_config: PluginSource = None, plugin_manager: Any = None, **kwargs: Any):
        bound = _TRL_SIGNATURE.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        model, peft_config = arguments["model"], arguments["peft_config"]

        self.plugins = plugin_manager or create_plugin_manager()
        config, written = load_plugin_config(self.plugins, vlm_dpo_config)
        dpo_args = copy.copy(arguments["args"] or _default_args(model))
        context = self._run_context(dpo_args, uses_peft=peft_config is not None or is_peft_model(model))
        reconciled = reconcile(dpo_args, config, written)
        self.vlm_dpo_bind(start_run(self.plugins, reconciled, context, "vlm_dpo_config", dpo_args))
        self._trl_computes_loss = self._vlm_dpo_run.framework_computes_loss
        dpo_args.max_grad_norm = framework_max_grad_norm(
            self.vlm_dpo_config, context.uses_deepspeed, dpo_args.max_grad_norm
        )
        arguments["args"] = dpo_args
        self._optimizer_passed_in = (arguments["optimizers"] or (None,))[0] is not None
        arguments["peft_config"] = lora_targets_from_policy(self.plugins, model, peft_config)
        arguments["train_dataset"] = with_row_index(arguments["train_dataset"], self._row_index_key())

        super().__init__(*bound.args[1:], **bound.kwargs)

        self.data_collator = _collator_fixed_for_model(self.data_collator, self.model, self.processing_class)
        if not self._trl_computes_loss:
            self.beta = self.vlm_dpo_config.loss.beta
        self.vlm_dpo_attach(framework_computes_loss=self._trl_computes_loss)

    # -- set-up ------------------------------------------------------------

    def _run_context(self, args: Any, *, uses_peft: bool) -> RunContext:
        return run_context(
            "trl", trl.__version__, args, uses_peft=uses_peft, gradient_checkpointing=bool(args.gradient_checkpointing)
        )

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        key = self._row_index_key()
        if key is not None and self._signature_columns is not None and key not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, key]

    # -- training ------------------------------------------------------------

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool):
        if self._trl_computes_loss:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        step = self.vlm_dpo_run_step(model, inputs)
        outputs = step.outputs
        loss = step.output.losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        for name, value in preference_metrics(step.output, step.logps, self.accelerator.gather_for_metrics).items():
            self._metrics[mode][name].append(value)
        record_token_metrics(self._metrics[mode], self.accelerator, outputs, inputs["completion_mask"])
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_inputs(inputs))
            return loss, outputs
        return loss

    def vlm_dpo_step_inputs(self, batch: dict[str, Any]) -> StepInputs:
        extended = self.vlm_dpo_step.extend(batch)
        return StepInputs(
            model_inputs(extended),
            completion_labels(extended),
            extended["completion_mask"],
            extended,
            pairs=batch["input_ids"].shape[0] // 2,
            forward=self._policy_forward,
            reference_forward=_fused_forward,
        )

    def _policy_forward(self, model: Any, prepared: PreparedBatch, batch: dict[str, Any]):
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        return _fused_forward(model, prepared, batch, **extra)

    def vlm_dpo_reference_model(self, model: Any) -> tuple[Any, list[Any]]:
        no_checkpointing = disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)
        if self.ref_model is not None or not is_peft_model(self.model):
            return self.ref_model, [no_checkpointing]
        unwrapped = self.accelerator.unwrap_model(self.model)
        adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        # Only switching adapters touches requires_grad; entered first, so it restores after the adapter is back.
        return self.model, [requires_grad_kept(self.model), no_checkpointing, adapter]

    def vlm_dpo_context(self) -> RunContext:
        context = self._run_context(self.args, uses_peft=is_peft_model(self.model))
        return dataclasses.replace(context, model_type=getattr(self.model.config, "model_type", None))


def _fused_forward(model: Any, prepared: PreparedBatch, batch: dict[str, Any], **extra: Any):
    """TRL's fused LM head: per-token log-probs of the labels, mapped back to the collated rows, summed."""
    with head_unsharded(model):
        outputs = model(**prepared.kwargs, **extra, labels=prepared.labels, fused_lm_head=True)
    outputs = collated_outputs(outputs, prepared)
    return summed_logps(outputs.log_probs, batch["completion_mask"]), outputs


def _collator_fixed_for_model(collator: Any, model: Any, processing_class: Any) -> Any:
    """TRL's vision collator, with what it gets wrong for some families put right (docs/models.md): for a prefix LM
    (PaliGemma) the processor refuses the responses alone; for a cross-attention model (Mllama) it keeps
    ``cross_attention_mask`` at prompt length (the model cannot train) and the processor starts each response
    with BOS."""
    if is_prefix_lm_processor(getattr(collator, "processor", None)):
        collator.processor = ResponsesAsSuffix(collator.processor)
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
    image_token = getattr(config, "image_token_index", None)
    tokenizer = getattr(processing_class, "tokenizer", None)
    if not getattr(text_config, "cross_attention_layers", None) or image_token is None or tokenizer is None:
        return collator
    if tokenizer.bos_token_id is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        collator = ResponsesWithoutBos(collator, tokenizer.bos_token_id, pad, "TRL")
    return FullLengthCrossAttention(collator, image_token)


def _default_args(model: Any) -> Any:
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
    return trl.DPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-DPO")
