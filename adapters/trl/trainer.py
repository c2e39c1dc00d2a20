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
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import math
import os
from typing import Any

import torch
import trl
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter
from vlm_dpo_plugins.adapters.trl.batch import (
    completion_labels,
    model_inputs,
    split_rows,
    summed_logps,
    with_corrupted_chosen,
)
from vlm_dpo_plugins.adapters.trl.checkpoint_format import reload_if_keys_were_renamed, runtime_format_saves
from vlm_dpo_plugins.adapters.trl.checkpoint_state import collect_state, read_state, write_state
from vlm_dpo_plugins.adapters.trl.metrics import record_preference_metrics, record_token_metrics
from vlm_dpo_plugins.adapters.trl.optimizer_step import GuardedOptimizerStep
from vlm_dpo_plugins.adapters.trl.settings import PluginSource, load_plugin_config, reconcile

from vlm_dpo_plugins.collation.wrapper import HookedCollator, keep_rows, scan_dataset
from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.errors import ConfigError, PluginError
from vlm_dpo_plugins.freeze.apply import apply_trainable, is_adapter_parameter
from vlm_dpo_plugins.freeze.optimizer import optimizer_param_groups, unfreeze_into_optimizer
from vlm_dpo_plugins.guards.clipping import parameters_by_group
from vlm_dpo_plugins.guards.deepspeed import tune_deepspeed_config, zero_stage
from vlm_dpo_plugins.guards.deepspeed_buckets import model_hidden_size
from vlm_dpo_plugins.losses.logprobs import preference_logps
from vlm_dpo_plugins.losses.mdpo import corrupted_image_extras
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import Finding, LossInputs, RunContext

logger = logging.getLogger("vlm_dpo_plugins.adapters.trl")

_TRL_SIGNATURE = inspect.signature(trl.DPOTrainer.__init__)


class VLMDPOTrainer(trl.DPOTrainer):
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

        self.vlm_dpo_findings: list[Finding] = []
        self._events_reported = 0
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

        self._groups = self.plugins.hook.vlm_dpo_classify_parameters(
            model=self.model, model_type=getattr(self.model.config, "model_type", None)
        )
        self._trainable_wanted: set[str] | None = None
        # PEFT decided which adapters train (TRL adds a frozen "ref" copy of a pretrained adapter); the policy
        # may narrow that set by group, never widen it to another adapter.
        self._adapters_peft_trains = {
            name for name, p in self.model.named_parameters() if p.requires_grad and is_adapter_parameter(name)
        }
        self._apply_freeze_policy(step=0)
        self._learning_rates: dict[str, float] = {}
        self._optimizer_layout_from_trainer = False
        self._parameters_cache: dict[str, list[torch.nn.Parameter]] | None = None
        self._tune_deepspeed(context)

        self._framework_collator = self.data_collator
        self.data_collator = HookedCollator(self.plugins, self.data_collator)
        self._scan_skipped_rows: list[int] | None = None
        self._guarded_step = GuardedOptimizerStep(
            self.plugins,
            parameters=self._trainable_by_group,
            current_step=lambda: self.state.global_step,
            save_checkpoint=self._save_checkpoint_now,
            report_grad_norm=self._fill_logged_grad_norm,
        )
        self._logged_grad_norm: torch.Tensor | None = None
        self.add_callback(_PluginLifecycle(self))

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
        ddp = self.plugins.hook.vlm_dpo_ddp_kwargs(context=context) or {}
        if "static_graph" in ddp:
            args.ddp_static_graph = ddp["static_graph"]
        if "find_unused_parameters" in ddp:
            if args.ddp_find_unused_parameters not in (None, ddp["find_unused_parameters"]):
                logger.warning(
                    "vlm-dpo: ddp_find_unused_parameters=%s changed to %s: with reentrant checkpointing under DDP it "
                    "raises 'Expected to mark a variable ready only once'",
                    args.ddp_find_unused_parameters,
                    ddp["find_unused_parameters"],
                )
            args.ddp_find_unused_parameters = ddp["find_unused_parameters"]

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

    def _tune_deepspeed(self, context: RunContext) -> None:
        hf_config = getattr(self.args, "hf_deepspeed_config", None)
        if hf_config is None:
            return
        # Under ZeRO-3 zero.Init a parameter is already partitioned: numel() is 0, ds_numel the real size.
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters() if p.requires_grad)
        merge = tune_deepspeed_config(
            self.plugins,
            hf_config.config,
            trainable_parameters=trainable,
            hidden_size=model_hidden_size(self.model.config),
            context=context,
        )
        # In place: accelerate's DeepSpeed plugin holds this same dict and builds the engine from it in train().
        hf_config.config.clear()
        hf_config.config.update(merge.config)
        logger.info("vlm-dpo: DeepSpeed %s", merge.report())
        for note in merge.notes:
            logger.warning("vlm-dpo: DeepSpeed: %s", note)

    # -- freeze policy -------------------------------------------------------

    def _apply_freeze_policy(self, step: int) -> set[str]:
        wanted = self.plugins.hook.vlm_dpo_trainable_parameters(groups=self._groups, step=step)
        if wanted is None:
            return set()
        if self._adapters_peft_trains:
            wanted = {n for n in wanted if not is_adapter_parameter(n) or n in self._adapters_peft_trains}
        if wanted == self._trainable_wanted:
            return set()
        self._trainable_wanted = wanted
        self._parameters_cache = None
        return apply_trainable(self.model, wanted, self._groups)

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            if not self._optimizer_passed_in:
                return self.optimizer  # built here already (DeepSpeed's set-up asks first, the loop again)
            logger.warning(
                "vlm-dpo: the optimizer was passed in (optimizers=...), so freeze.learning_rates and unfreeze stages "
                "cannot add per-group learning rates; frozen parameters simply get no gradient"
            )
            return self.optimizer
        deepspeed_config = getattr(self.args, "hf_deepspeed_config", None)
        if deepspeed_config is not None and "optimizer" in deepspeed_config.config:
            return super().create_optimizer(model)  # DeepSpeed builds the optimizer from its own config
        if self._optimizer_layout_from_trainer:
            logger.warning(
                "vlm-dpo: resuming from a checkpoint not written by VLMDPOTrainer: the optimizer keeps the Trainer's "
                "param groups so its saved state loads; freeze.learning_rates do not apply in this run"
            )
            return super().create_optimizer(model)
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        optimizer_groups = self.plugins.hook.vlm_dpo_optimizer_groups(
            groups=self._groups, trainable=trainable, base_learning_rate=self.args.learning_rate
        )
        if optimizer_groups is None:
            return super().create_optimizer(model)
        self._learning_rates = {entry["group"]: entry["lr"] for entry in optimizer_groups}
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        param_groups = optimizer_param_groups(self.model, optimizer_groups, weight_decay=self.args.weight_decay)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def _unfreeze_for_step(self, step: int) -> None:
        newly = self._apply_freeze_policy(step)
        if not newly or self.optimizer is None:
            return
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        added = unfreeze_into_optimizer(self.model, optimizer, newly, self._groups, self._learning_rates, scheduler)
        logger.warning(
            "vlm-dpo: step %d: unfroze %s",
            step,
            ", ".join(f"{len(names)} {group} parameter(s)" for group, names in added.items()),
        )

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        """The norm the Trainer logs, without its own pass over every gradient.

        With its clipping off, the Trainer would still run ``clip_grad_norm_(..., inf)`` before the optimizer
        step just to log a norm: a second read and write of every gradient. The guarded step measures the same
        pre-clip total (summed as torch sums it), so the Trainer gets a tensor that step fills in; the Trainer
        reads it only when it logs, after the step.
        """
        if grad_norm is not None or self.is_deepspeed_enabled:
            return super()._get_grad_norm(model, grad_norm)
        self._logged_grad_norm = torch.full((), math.nan)
        return self._logged_grad_norm

    def _fill_logged_grad_norm(self, total: float) -> None:
        if self._logged_grad_norm is not None:
            self._logged_grad_norm.fill_(total)

    def _trainable_by_group(self) -> dict[str, list[torch.nn.Parameter]]:
        if self._parameters_cache is None:
            self._parameters_cache = parameters_by_group(self.model.named_parameters(), self._groups)
        return self._parameters_cache

    # -- training ------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        if checkpoint is not None:
            self._restore_plugin_state(checkpoint)
        self._prescan_dataset()
        return super().train(checkpoint, *args, **kwargs)

    def _resolve_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        if resume_from_checkpoint is True:
            found = get_last_checkpoint(self.args.output_dir)
            if found is None:
                raise ValueError(f"no valid checkpoint found in output directory ({self.args.output_dir})")
            return found
        return resume_from_checkpoint or None

    def _restore_plugin_state(self, checkpoint: str) -> None:
        from transformers.trainer_callback import TrainerState

        states = read_state(checkpoint, self.args.process_index)
        # A checkpoint from stock TRL holds an optimizer with the Trainer's param groups; ours must match it to load.
        self._optimizer_layout_from_trainer = states is None
        if states is not None:
            self.plugins.hook.vlm_dpo_load_state_dict(states=states)
            self._scan_skipped_rows = states.get("adapter", {}).get("scan_skipped_rows")
        step = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json")).global_step
        # Before the optimizer exists, so it is built with the stage's parameters, as the saved state expects.
        self._apply_freeze_policy(step)

    def _prescan_dataset(self) -> None:
        collation = self.vlm_dpo_config.collation
        if not (collation.enabled and collation.prescan) or not isinstance(self.train_dataset, Dataset):
            return
        skipped = self._scan_skipped_rows
        if skipped is None:
            summary = scan_dataset(
                self.plugins,
                self.train_dataset,
                self._framework_collator,
                batch_size=self.args.per_device_train_batch_size,
                output_dir=self.args.output_dir,
            )
            summary.raise_for_errors()
            skipped = sorted(set(range(len(self.train_dataset))) - set(keep_rows(len(self.train_dataset), summary)))
            if skipped:
                logger.warning(
                    "vlm-dpo: %d of %d rows left out before training by the collation checks (listed in %s)",
                    len(skipped),
                    len(self.train_dataset),
                    summary.report_path,
                )
        self._scan_skipped_rows = skipped
        if skipped:
            dropped = set(skipped)
            self.train_dataset = self.train_dataset.select(
                [row for row in range(len(self.train_dataset)) if row not in dropped]
            )

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            self._guarded_step.record_loss(result[0] if return_outputs else result)
        return result

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool):
        if self._trl_computes_loss:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        pairs = inputs["input_ids"].shape[0] // 2
        batch = with_corrupted_chosen(inputs) if self._needs_corrupted_image else inputs
        kwargs, labels = model_inputs(batch), completion_labels(batch)
        if self.aux_loss_enabled:
            kwargs["output_router_logits"] = True
        outputs = model(**kwargs, labels=labels, fused_lm_head=True)
        policy = summed_logps(outputs.log_probs, batch["completion_mask"])
        reference = self._reference_logps(batch, kwargs, labels) if self._loss_inputs.reference else None

        extras = {}
        if self._needs_corrupted_image:
            policy, policy_corrupted = split_rows(policy, 2 * pairs)
            reference, reference_corrupted = split_rows(reference, 2 * pairs)
            extras = corrupted_image_extras(policy_corrupted, reference_corrupted)
        logps = preference_logps(policy, reference, extras)
        output = self.plugins.hook.vlm_dpo_compute_loss(logps=logps, config=self.vlm_dpo_config)
        if output is None:
            raise PluginError(
                f"no plugin computed loss.type {self.vlm_dpo_config.loss.type!r}: the plugin that registers it must "
                "also implement vlm_dpo_compute_loss"
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

    def _reference_logps(self, batch: dict[str, Any], kwargs: dict[str, Any], labels: torch.Tensor):
        from vlm_dpo_plugins.losses.logprobs import SequenceLogps

        if self.precompute_ref_logps:
            precomputed = torch.cat((batch["ref_chosen_logps"], batch["ref_rejected_logps"]))
            return SequenceLogps(precomputed, batch["completion_mask"][:, 1:].sum(dim=1))
        kwargs = {key: value for key, value in kwargs.items() if key != "output_router_logits"}
        adapter = kept = contextlib.nullcontext()
        reference_model = self.ref_model
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
            kept = _requires_grad_kept(self.model)  # only switching adapters touches requires_grad
            reference_model = self.model
        no_checkpointing = disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)
        with kept, torch.no_grad(), no_checkpointing, adapter:
            outputs = reference_model(**kwargs, labels=labels, fused_lm_head=True)
        return summed_logps(outputs.log_probs, batch["completion_mask"])

    # -- logging and checkpoints ------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        training_log = "loss" in logs and self.model.training
        if training_log:
            for extra in self.plugins.hook.vlm_dpo_metrics(step=self.state.global_step):
                logs.update(extra)
        super().log(logs, start_time)  # TRL adds its averaged metrics to ``logs`` in place
        numbers = {key: float(value) for key, value in logs.items() if isinstance(value, (int, float))}
        for findings in self.plugins.hook.vlm_dpo_on_log(step=self.state.global_step, metrics=numbers):
            for finding in findings:
                self.vlm_dpo_findings.append(finding)
                if self.args.should_log:
                    logger.warning("vlm-dpo: step %d: %s", self.state.global_step, finding)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        with runtime_format_saves(self.model):
            super()._save_checkpoint(model, trial)
        if trial is None:
            self._write_plugin_state(self._checkpoint_dir())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        reload_if_keys_were_renamed(model if model is not None else self.model, resume_from_checkpoint)

    def _checkpoint_dir(self) -> str:
        return os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")

    def _write_plugin_state(self, checkpoint_dir: str) -> None:
        adapter_state = {"scan_skipped_rows": self._scan_skipped_rows, "global_step": self.state.global_step}
        write_state(checkpoint_dir, self.args.process_index, collect_state(self.plugins, adapter_state))

    def _save_checkpoint_now(self) -> str:
        """Called by the guards before they halt training: the weights of the last step taken, kept."""
        self._save_checkpoint(self.model_wrapped, trial=None)
        return self._checkpoint_dir()

    def _install_guarded_step(self) -> None:
        engine = self.model_wrapped if self.is_deepspeed_enabled else None
        self._guarded_step.install(self.optimizer, deepspeed_engine=engine, scaler=self.accelerator.scaler)

    def vlm_dpo_events(self, logged_step: int) -> list[str]:
        """What the guards did in the optimizer steps up to ``logged_step`` not reported yet ("skipped: ...")."""
        events = []
        for outcome in self._guarded_step.outcomes[self._events_reported :]:
            if outcome.step >= logged_step:  # the Trainer logs after counting the step: step k is logged as k + 1
                break
            self._events_reported += 1
            if outcome.skipped:
                events.append(f"skipped step {outcome.step + 1}: {'; '.join(outcome.reasons)}")
        return events

    def vlm_dpo_context(self) -> RunContext:
        context = self._run_context(self.args, uses_peft=is_peft_model(self.model))
        return dataclasses.replace(context, model_type=getattr(self.model.config, "model_type", None))


class _PluginLifecycle(TrainerCallback):
    """The lifecycle hooks at the Trainer's callback points; the trainer itself does the rest."""

    def __init__(self, trainer: VLMDPOTrainer) -> None:
        self.trainer = trainer
        self.last_logs: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer._install_guarded_step()
        trainer.plugins.hook.vlm_dpo_train_begin(model=trainer.model, context=trainer.vlm_dpo_context())

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._unfreeze_for_step(state.global_step)
        self.trainer.plugins.hook.vlm_dpo_step_begin(step=state.global_step, model=self.trainer.model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.last_logs = {key: float(v) for key, v in logs.items() if isinstance(v, (int, float))}

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.plugins.hook.vlm_dpo_train_end(context=self.trainer.vlm_dpo_context(), metrics=self.last_logs)


@contextlib.contextmanager
def _requires_grad_kept(model: Any):
    """Leaves every ``requires_grad`` as it was on entry.

    Re-enabling the adapter after the reference pass (PEFT's ``set_adapter``) marks every parameter of the
    active adapter trainable, the LoRA weights the freeze policy froze in the vision tower included: they
    would then get gradients, and checkpointed layers recompute with different metadata and raise.
    Entered before the adapter context, so it restores after the adapter is back.
    """
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _default_args(model: Any) -> Any:
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
    return trl.DPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-DPO")
