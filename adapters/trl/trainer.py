"""``VLMDPOTrainer``: TRL's ``DPOTrainer`` with every vlm-dpo-plugins hook inside its own training loop.

    from vlm_dpo_plugins.adapters.trl import VLMDPOTrainer
    trainer = VLMDPOTrainer(model=model, args=dpo_config, train_dataset=dataset,
                            processing_class=processor, vlm_dpo_config="plugins.yaml")

Same arguments as ``trl.DPOTrainer`` plus ``vlm_dpo_config`` (a ``VLMDPOConfig``, a
dict or a YAML path) and ``plugin_manager``. Where the hooks run:

- ``__init__``: settings reconciled with ``DPOConfig`` (``settings.py``); gradient
  checkpointing and DDP arguments from the guards' plan, set before TRL and the
  Trainer read them; after TRL built the model (and any PEFT wrapper): the freeze
  policy, the DeepSpeed bucket tuning (into the config accelerate will use), and the
  collator wrapped so every batch goes through ``vlm_dpo_collate``.
- ``create_optimizer``: one param group per freeze group with its learning rate.
- ``train``: plugin state restored from the checkpoint, the dataset pre-scanned.
- each step: progressive unfreezing and ``vlm_dpo_step_begin``; the loss from
  ``vlm_dpo_compute_loss``; ``optimizer.step`` replaced by the guarded step.
- ``log``: the plugins' metrics added, then every logged dict given to the detectors.
- ``_save_checkpoint``: the plugins' state written next to TRL's, the weights in the
  layout ``resume_from_checkpoint`` reads back (``checkpoint_format.py``).

What is the same in every Trainer-based framework (freeze policy, optimizer groups,
guarded step, collator, logs, checkpoint state) is ``hf_trainer.PluginTrainerMixin``;
this class adds what is TRL's: its arguments, its batch and its loss.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
from typing import Any

import torch
import trl
from accelerate.utils import is_peft_model
from datasets import Dataset
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter
from vlm_dpo_plugins.adapters.hf_trainer.checkpointing import apply_ddp_plan
from vlm_dpo_plugins.adapters.hf_trainer.plugin_trainer import PluginTrainerMixin, requires_grad_kept
from vlm_dpo_plugins.adapters.trl.batch import (
    collated_outputs,
    completion_labels,
    model_inputs,
    summed_logps,
    with_corrupted_chosen,
)
from vlm_dpo_plugins.adapters.trl.checkpoint_format import reload_if_keys_were_renamed, runtime_format_saves
from vlm_dpo_plugins.adapters.trl.metrics import record_preference_metrics, record_token_metrics
from vlm_dpo_plugins.adapters.trl.settings import reconcile

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.config_source import PluginSource, load_plugin_config
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.guards.deepspeed import zero_stage
from vlm_dpo_plugins.losses.compute import compute_preference_loss
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.sharing.forward import PreparedBatch
from vlm_dpo_plugins.types import LossInputs, RunContext

logger = logging.getLogger("vlm_dpo_plugins.adapters.trl")

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
        settings = reconcile(dpo_args, config, written)
        for note in settings.notes:
            logger.info("vlm-dpo: %s", note)
        self.vlm_dpo_config: VLMDPOConfig = settings.config
        self._trl_computes_loss = settings.trl_computes_loss
        self.plugins.hook.vlm_dpo_configure(config=self.vlm_dpo_config)

        context = self._run_context(dpo_args, uses_peft=peft_config is not None or is_peft_model(model))
        self._plan_checkpointing(dpo_args, context)
        self._guard_max_grad_norm = self.vlm_dpo_config.guards.max_grad_norm
        if not context.uses_deepspeed:
            dpo_args.max_grad_norm = 0.0  # the guards clip, per group, inside the guarded step
        elif self._guard_max_grad_norm is not None:
            dpo_args.max_grad_norm = self._guard_max_grad_norm  # DeepSpeed's "gradient_clipping": "auto"
        arguments["args"] = dpo_args
        self._optimizer_passed_in = (arguments["optimizers"] or (None,))[0] is not None
        arguments["peft_config"] = self._lora_targets_from_policy(model, peft_config)
        arguments["train_dataset"] = self._with_row_index(arguments["train_dataset"])

        super().__init__(*bound.args[1:], **bound.kwargs)

        loss_type = self.vlm_dpo_config.loss.type
        self._loss_inputs: LossInputs = self.plugins.hook.vlm_dpo_loss_inputs(loss_type=loss_type) or LossInputs()
        self._needs_corrupted_image = not self._trl_computes_loss and bool(self._loss_inputs.extras)
        if self._needs_corrupted_image and self.precompute_ref_logps:
            raise ConfigError(
                f"loss.type {self.vlm_dpo_config.loss.type!r} needs reference log-probs of the chosen response under a "
                "corrupted image, which precompute_ref_log_probs=True does not store: set it to False"
            )
        if not self._trl_computes_loss:
            self.beta = self.vlm_dpo_config.loss.beta
        self._attach_plugins()
        # TRL's own loss runs its own forwards; mDPO's third block of rows repeats the chosen ones with other images.
        self._set_up_sharing(
            usable=not (self._trl_computes_loss or self._needs_corrupted_image),
            reference_model=self.ref_model,
            reference_pass=self._loss_inputs.reference and not self.precompute_ref_logps,
        )

    # -- set-up ------------------------------------------------------------

    def _run_context(self, args: Any, *, uses_peft: bool) -> RunContext:
        deepspeed_config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
        return RunContext(
            framework="trl",
            framework_version=trl.__version__,
            model_type=None,
            world_size=args.world_size,
            rank=args.process_index,
            uses_peft=uses_peft,
            uses_deepspeed=deepspeed_config is not None,
            deepspeed_stage=zero_stage(deepspeed_config) if deepspeed_config is not None else None,
            uses_fsdp=bool(args.fsdp),
            gradient_checkpointing=bool(args.gradient_checkpointing),
            mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else None,
            output_dir=args.output_dir,
        )

    def _plan_checkpointing(self, args: Any, context: RunContext) -> None:
        """Checkpointing and DDP settings that cannot raise "Expected to mark a variable ready only once"."""
        if not args.gradient_checkpointing:
            return
        kwargs = self.plugins.hook.vlm_dpo_gradient_checkpointing_kwargs(context=context) or {}
        args.gradient_checkpointing_kwargs = {**(args.gradient_checkpointing_kwargs or {}), **kwargs}
        apply_ddp_plan(self.plugins, context, args)

    def _lora_targets_from_policy(self, model: Any, peft_config: Any) -> Any:
        """LoRA on the trainable groups only, when the user left the targets to PEFT ("all-linear" or unset).

        PEFT's defaults match module names such as ``q_proj`` or every linear layer, which in a VLM includes
        the vision tower: adapters there either train the part the freeze policy keeps fixed or sit frozen.
        """
        if peft_config is None or isinstance(model, str) or not hasattr(peft_config, "target_modules"):
            return peft_config
        if peft_config.target_modules not in (None, "all-linear"):
            return peft_config
        groups = self.plugins.hook.vlm_dpo_classify_parameters(
            model=model, model_type=getattr(model.config, "model_type", None)
        )
        targets = self.plugins.hook.vlm_dpo_lora_target_modules(model=model, groups=groups)
        if not targets:
            return peft_config
        logger.info("vlm-dpo: LoRA on %d linear modules of the trainable groups", len(targets))
        peft_config = copy.copy(peft_config)
        peft_config.target_modules = set(targets)
        return peft_config

    def _with_row_index(self, dataset: Any) -> Any:
        key = self.vlm_dpo_config.collation.row_index_key
        if isinstance(dataset, Dataset) and key not in dataset.column_names:
            # Findings then name the row of the user's dataset, whatever order the sampler draws it in.
            return dataset.add_column(key, list(range(len(dataset))))
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        key = self.vlm_dpo_config.collation.row_index_key
        if self._signature_columns is not None and key not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, key]

    # -- training ------------------------------------------------------------

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._record_training_loss(result[0] if return_outputs else result)
        return result

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool):
        if self._trl_computes_loss:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        pairs = inputs["input_ids"].shape[0] // 2
        batch = with_corrupted_chosen(inputs) if self._needs_corrupted_image else inputs
        prepared = self._prepare_pairs(model_inputs(batch), completion_labels(batch), batch["completion_mask"])
        kwargs = dict(prepared.kwargs)
        if self.aux_loss_enabled:
            kwargs["output_router_logits"] = True
        with self._policy_pass(prepared):
            outputs = model(**kwargs, labels=prepared.labels, fused_lm_head=True)
        outputs = collated_outputs(outputs, prepared)
        policy = summed_logps(outputs.log_probs, batch["completion_mask"])
        reference = self._reference_logps(batch, prepared) if self._loss_inputs.reference else None

        output, logps = compute_preference_loss(
            self.plugins,
            self.vlm_dpo_config,
            policy,
            reference,
            pairs=pairs,
            with_corrupted_image=self._needs_corrupted_image,
        )
        loss = output.losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        record_preference_metrics(self._metrics[mode], self.accelerator, output, logps)
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

    def _reference_logps(self, batch: dict[str, Any], prepared: PreparedBatch):
        from vlm_dpo_plugins.losses.logprobs import SequenceLogps

        if self.precompute_ref_logps:
            precomputed = torch.cat((batch["ref_chosen_logps"], batch["ref_rejected_logps"]))
            return SequenceLogps(precomputed, batch["completion_mask"][:, 1:].sum(dim=1))
        adapter = kept = contextlib.nullcontext()
        reference_model = self.ref_model
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
            kept = requires_grad_kept(self.model)  # only switching adapters touches requires_grad
            reference_model = self.model
        shared = self._reference_pass(prepared, reference_model)
        no_checkpointing = disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)
        with kept, torch.no_grad(), no_checkpointing, adapter, shared:
            outputs = reference_model(**prepared.kwargs, labels=prepared.labels, fused_lm_head=True)
        return summed_logps(prepared.to_collated(outputs.log_probs), batch["completion_mask"])

    # -- checkpoints ------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        with runtime_format_saves(self.model):
            super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        reload_if_keys_were_renamed(model if model is not None else self.model, resume_from_checkpoint)

    def vlm_dpo_context(self) -> RunContext:
        context = self._run_context(self.args, uses_peft=is_peft_model(self.model))
        return dataclasses.replace(context, model_type=getattr(self.model.config, "model_type", None))


def _default_args(model: Any) -> Any:
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
    return trl.DPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-DPO")
