"""``PluginTrainerMixin``: the hooks a ``transformers.Trainer`` subclass wires the same way in every framework.

    class VLMDPOTrainer(PluginTrainerMixin, trl.DPOTrainer): ...
    class PluginDPOTrainer(PluginTrainerMixin, CustomDPOTrainer): ...   # LLaMA-Factory

The framework's trainer builds the model, optimizer arguments and loop; the subclass sets
``self.plugins`` and ``self.vlm_dpo_config``, calls ``_attach_plugins()`` at the end of its
``__init__`` and implements ``vlm_dpo_context()`` and the loss. From then on, inside the
Trainer's own loop:

- ``__init__`` (``_attach_plugins``): the freeze policy applied to the model the framework
  built, DeepSpeed bucket tuning written into the config accelerate builds the engine from,
  the collator wrapped so every batch goes through ``vlm_dpo_collate``;
- ``create_optimizer``: one param group per freeze group with its learning rate;
- ``train``: the plugins' state restored from the checkpoint, the dataset pre-scanned;
- each step: progressive unfreezing and ``vlm_dpo_step_begin``; each batch to ``vlm_dpo_check_batch``;
  ``optimizer.step`` replaced by
  the guarded step (clip, non-finite skip voted across ranks, LR schedule held);
- ``log``: the plugins' metrics added, then every logged dict given to the detectors;
- ``_save_checkpoint``: the plugins' state written next to the Trainer's, the folder marked as being
  written until both are done; ``train`` resumes only from a complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from vlm_dpo_plugins.adapters.hf_trainer.checkpoint_choice import choose_checkpoint, mark_saved, mark_saving
from vlm_dpo_plugins.adapters.hf_trainer.checkpoint_state import collect_state, read_state, write_state
from vlm_dpo_plugins.adapters.hf_trainer.optimizer_step import GuardedOptimizerStep
from vlm_dpo_plugins.adapters.hf_trainer.logits_forward import logits_forward
from vlm_dpo_plugins.adapters.hf_trainer.preference_step import PreferenceStep, StepResult

from vlm_dpo_plugins.collation.accounting import RowAccount
from vlm_dpo_plugins.collation.file_checks import CheckedFiles
from vlm_dpo_plugins.collation.report import CollationSummary
from vlm_dpo_plugins.collation.wrapper import HookedCollator, keep_rows, scan_dataset
from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.errors import VLMDPOError
from vlm_dpo_plugins.freeze.apply import apply_trainable, is_adapter_parameter
from vlm_dpo_plugins.freeze.report import trainable_report
from vlm_dpo_plugins.freeze.optimizer import optimizer_param_groups, unfreeze_into_optimizer
from vlm_dpo_plugins.guards.clipping import parameters_by_group
from vlm_dpo_plugins.guards.deepspeed import tune_deepspeed_config
from vlm_dpo_plugins.guards.deepspeed_buckets import model_hidden_size
from vlm_dpo_plugins.guards.deepspeed_live import describe_live_buckets
from vlm_dpo_plugins.runlog.findings import append_finding
from vlm_dpo_plugins.types import Finding, RunContext

logger = logging.getLogger("vlm_dpo_plugins.adapters")


class PluginTrainerMixin:
    plugins: Any
    vlm_dpo_config: VLMDPOConfig
    _optimizer_passed_in = False
    framework_limits_every_parameter = False
    """True: the policy may only narrow what the framework made trainable (LLaMA-Factory decides with its own
    flags, kept equal to the policy). False: only PEFT adapters are limited (TRL adds a frozen "ref" adapter
    that must stay frozen), every other parameter follows the policy."""
    vlm_dpo_checked_files: CheckedFiles | None = None
    """The training files the adapter checked before its framework read them (LLaMA-Factory, ms-swift)."""

    # -- set-up ------------------------------------------------------------------

    def _attach_plugins(self) -> None:
        self.vlm_dpo_findings: list[Finding] = []
        self._events_reported = 0
        self._groups = self.plugins.hook.vlm_dpo_classify_parameters(
            model=self.model, model_type=getattr(self.model.config, "model_type", None)
        )
        self._trainable_wanted: set[str] | None = None
        self._framework_trainable = {
            name
            for name, p in self.model.named_parameters()
            if p.requires_grad and (self.framework_limits_every_parameter or is_adapter_parameter(name))
        }
        self._apply_freeze_policy(step=0)
        self._warn_about_groups_the_framework_keeps_frozen()
        self._learning_rates: dict[str, float] = {}
        self._optimizer_layout_from_trainer = False
        self._parameters_cache: dict[str, list[torch.nn.Parameter]] | None = None
        self._tune_deepspeed(self.vlm_dpo_context())

        self._framework_collator = self.data_collator
        self.data_collator = HookedCollator(self.plugins, self.data_collator)
        self._scan_skipped_rows: list[int] | None = None
        self._loaded_rows = len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else None
        self._guarded_step = GuardedOptimizerStep(
            self.plugins,
            parameters=self._trainable_by_group,
            current_step=lambda: self.state.global_step,
            save_checkpoint=self._save_checkpoint_now,
            report_grad_norm=self._fill_logged_grad_norm,
        )
        self._logged_grad_norm: torch.Tensor | None = None
        self.add_callback(PluginLifecycle(self))

    def vlm_dpo_context(self) -> RunContext:
        """The run's facts with the model's type; an adapter without a prepared ``PluginRun`` overrides it."""
        return dataclasses.replace(self._vlm_dpo_run.context, model_type=getattr(self.model.config, "model_type", None))

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
        logger.info("vlm-dpo: %s", merge.report())
        for note in merge.notes:
            logger.warning("vlm-dpo: DeepSpeed: %s", note)

    # -- freeze policy and optimizer ------------------------------------------------

    def _apply_freeze_policy(self, step: int) -> set[str]:
        wanted = self.plugins.hook.vlm_dpo_trainable_parameters(groups=self._groups, step=step)
        if wanted is None:
            return set()
        if self._framework_trainable:
            limited = self._framework_trainable
            if self.framework_limits_every_parameter:
                wanted = wanted & limited
            else:
                wanted = {n for n in wanted if not is_adapter_parameter(n) or n in limited}
        if wanted == self._trainable_wanted:
            return set()
        self._trainable_wanted = wanted
        self._parameters_cache = None
        return apply_trainable(self.model, wanted, self._groups)

    def _warn_about_groups_the_framework_keeps_frozen(self) -> None:
        """A group the policy trains, but of which the framework made nothing trainable, stays frozen: say so."""
        freeze = self.vlm_dpo_config.section("freeze")
        if not self.framework_limits_every_parameter or freeze is None:
            return
        for group in sorted(freeze.groups_ever_trained()):
            names = self._groups.get(group, [])
            if names and not any(name in self._framework_trainable for name in names):
                logger.warning(
                    "vlm-dpo: the freeze policy trains the %s group, but %s: it stays frozen. %s",
                    group,
                    "the framework made none of its parameters trainable",
                    self._framework_trainable_hint(group),
                )

    def _framework_trainable_hint(self, group: str) -> str:
        return "Check the framework's own freeze and LoRA target settings."

    def _framework_optimizer_reason(self) -> str | None:
        """Why the framework must build the optimizer itself (per-group learning rates then do not apply)."""
        return None

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
                "vlm-dpo: resuming from a checkpoint written without vlm-dpo-plugins: the optimizer keeps the "
                "Trainer's param groups so its saved state loads; freeze.learning_rates do not apply in this run"
            )
            return super().create_optimizer(model)
        reason = self._framework_optimizer_reason()
        if reason is not None:
            logger.warning("vlm-dpo: %s builds the optimizer; freeze.learning_rates do not apply in this run", reason)
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

    def _trainable_by_group(self) -> dict[str, list[torch.nn.Parameter]]:
        if self._parameters_cache is None:
            self._parameters_cache = parameters_by_group(self.model.named_parameters(), self._groups)
        return self._parameters_cache

    # -- the DPO step ------------------------------------------------------------------

    def _set_up_preference_step(self, *, framework_computes_loss: bool, reference_pass: bool = True) -> None:
        """The shared loss path, bound to the model and reference the framework built (``preference_step.py``)."""
        self.vlm_dpo_step = PreferenceStep(
            self.plugins,
            self.vlm_dpo_config,
            self.model,
            self._groups,
            framework_computes_loss=framework_computes_loss,
            reference_model=self.ref_model,
            reference_pass=reference_pass,
            unwrap=self.accelerator.unwrap_model,
        )

    def logits_step(self, model: Any, batch: dict[str, Any], ignore_index: int) -> StepResult:
        """The step for a framework whose batch has ``labels`` (``ignore_index`` outside the responses) and whose
        model returns logits (LLaMA-Factory, ms-swift)."""
        extended = self.vlm_dpo_step.extend(batch)
        labels = extended["labels"]
        return self.vlm_dpo_step.run(
            model,
            {key: value for key, value in extended.items() if key != "labels"},
            labels,
            labels != ignore_index,
            batch=extended,
            pairs=batch["labels"].shape[0] // 2,
            forward=lambda model, prepared, _: logits_forward(model, prepared, ignore_index),
            reference=self._reference_model,
        )

    def _reference_model(self, model: Any) -> tuple[Any, list[Any]]:
        """The model of the reference pass and the contexts to run it in, given the model the step runs."""
        raise NotImplementedError

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, *args: Any, **kwargs: Any):
        result = super().compute_loss(model, inputs, return_outputs, *args, **kwargs)
        self._record_training_loss(result[0] if return_outputs else result)
        return result

    def announce(self, framework: str, origin: str, loss: str) -> None:
        """The start line: where the settings came from, the loss, beta and what trains, group by group."""
        report = trainable_report(self._groups, self.model)
        trainable = ", ".join(
            f"{group} {int(numbers['trainable']):,}/{int(numbers['parameters']):,}" for group, numbers in report.items()
        )
        logger.info(
            "vlm-dpo: active in %s's DPO trainer (settings from %s): loss %s, beta %s; trainable: %s",
            framework,
            origin,
            loss,
            self.vlm_dpo_config.loss.beta,
            trainable,
        )

    # -- gradient norm -------------------------------------------------------------

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

    # -- training ------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        if checkpoint is not None:
            self._restore_plugin_state(checkpoint)
        self._prescan_dataset()
        return super().train(checkpoint, *args, **kwargs)

    def _resolve_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        return choose_checkpoint(resume_from_checkpoint, self.args.output_dir)

    def _restore_plugin_state(self, checkpoint: str) -> None:
        from transformers.trainer_callback import TrainerState

        states = read_state(checkpoint, self.args.process_index)
        # A checkpoint written without the plugins holds an optimizer with the Trainer's param groups; ours must
        # match it to load.
        self._optimizer_layout_from_trainer = states is None
        if states is not None:
            self.plugins.hook.vlm_dpo_load_state_dict(states=states)
            self._scan_skipped_rows = states.get("adapter", {}).get("scan_skipped_rows")
        step = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json")).global_step
        # Before the optimizer exists, so it is built with the stage's parameters, as the saved state expects.
        self._apply_freeze_policy(step)

    def _prescan_dataset(self) -> None:
        collation = self.vlm_dpo_config.collation
        if not (collation.enabled and collation.prescan) or not self._can_prescan():
            self._log_row_account()
            return
        total = len(self.train_dataset)
        skipped = self._scan_skipped_rows
        if skipped is None:
            summary = scan_dataset(
                self.plugins,
                self._prescan_examples(),
                self._framework_collator,
                batch_size=self.args.per_device_train_batch_size,
                output_dir=self.args.output_dir,
            )
            self._add_prescan_findings(summary)
            summary.raise_for_errors()
            skipped = sorted(set(range(total)) - set(keep_rows(total, summary, self._prescan_row_indices())))
            if skipped:
                logger.warning(
                    "vlm-dpo: %d of %d rows left out before training by the collation checks (listed in %s)",
                    len(skipped),
                    total,
                    summary.report_path,
                )
        self._scan_skipped_rows = skipped
        if len(skipped) == total > 0:
            raise VLMDPOError(
                f"the collation checks left out every one of the {len(skipped)} training rows (listed in "
                f"{self.vlm_dpo_config.collation.report_path or 'collation_report.jsonl in the output folder'}): "
                "nothing is left to train on; fix the data, or set collation.policy for the checks named there"
            )
        if skipped:
            dropped = set(skipped)
            self.train_dataset = self._select_rows([row for row in range(total) if row not in dropped])
        self._log_row_account(len(skipped))

    # The pre-scan's steps, for an adapter whose framework hands over another kind of dataset (ms-swift).

    def _can_prescan(self) -> bool:
        from datasets import Dataset

        return isinstance(self.train_dataset, Dataset)

    def _prescan_examples(self) -> Iterable[Mapping[str, Any]]:
        return self.train_dataset

    def _prescan_row_indices(self) -> list[int] | None:
        key = self.vlm_dpo_config.collation.row_index_key
        return self.train_dataset[key] if key in self.train_dataset.column_names else None

    def _add_prescan_findings(self, summary: CollationSummary) -> None:
        """Findings of the pre-scan outside the collator's checks (an encoder that raised) join the summary."""

    def _select_rows(self, positions: list[int]) -> Any:
        return self.train_dataset.select(positions)

    def _log_row_account(self, skipped_by_prescan: int | None = None) -> None:
        files = self.vlm_dpo_checked_files
        if files is None or not files.source or self._loaded_rows is None:
            return
        RowAccount(
            source=files.source,
            framework=files.framework,
            rows_in=files.rows_in,
            skipped_by_file_checks=files.skipped_before_loading,
            loaded=self._loaded_rows,
            skipped_by_prescan=skipped_by_prescan,
        ).log(logger)

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        # The detectors keep a reference to the batch and look into it only to explain a stall.
        for findings in self.plugins.hook.vlm_dpo_check_batch(batch=inputs, step=self.state.global_step):
            self._keep_findings(findings)
        return super().training_step(model, inputs, *args, **kwargs)

    def _record_training_loss(self, loss: torch.Tensor) -> None:
        if self.model.training:
            self._guarded_step.record_loss(loss)

    # -- logging and checkpoints -------------------------------------------------------

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self.model.training:
            for extra in self.plugins.hook.vlm_dpo_metrics(step=self.state.global_step):
                logs.update(extra)
        self._detectors_ran = False
        super().log(logs, *args, **kwargs)  # the framework adds its averaged metrics to ``logs`` in place
        if not self._detectors_ran:
            self.run_detectors(logs)

    def run_detectors(self, logs: dict[str, Any]) -> list[Finding]:
        """Give one logged dict to the detectors; their findings are kept, printed, and returned.

        ``log`` calls it after the framework's ``log``; an adapter whose framework writes the line to a file
        inside ``on_log`` calls it earlier, from a callback, to put the findings on that same line.
        """
        self._detectors_ran = True
        numbers = {key: float(value) for key, value in logs.items() if isinstance(value, (int, float))}
        found = []
        for findings in self.plugins.hook.vlm_dpo_on_log(step=self.state.global_step, metrics=numbers):
            found += self._keep_findings(findings)
        return found

    def _keep_findings(self, findings: list[Finding]) -> list[Finding]:
        for finding in findings:
            self.vlm_dpo_findings.append(finding)
            if self.args.should_log:
                logger.warning("vlm-dpo: step %d: %s", self.state.global_step, finding)
                append_finding(self.args.output_dir, finding, self.state.global_step)
        return list(findings)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if trial is not None:
            return super()._save_checkpoint(model, trial)
        checkpoint_dir = self._checkpoint_dir()
        # Until the marker is gone, a resumed run will not pick this folder: a kill mid-save leaves it behind.
        mark_saving(checkpoint_dir, self.args.process_index)
        super()._save_checkpoint(model, trial)
        self._write_plugin_state(checkpoint_dir)
        mark_saved(checkpoint_dir, self.args.process_index)

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
        live = describe_live_buckets(engine) if engine is not None else None
        if live is not None and self.is_world_process_zero():
            logger.info("vlm-dpo: %s", live)  # what the engine uses, read back after the framework built it

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


class PluginLifecycle(TrainerCallback):
    """The lifecycle hooks at the Trainer's callback points; the trainer itself does the rest."""

    def __init__(self, trainer: PluginTrainerMixin) -> None:
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
def requires_grad_kept(model: Any):
    """Leaves every ``requires_grad`` as it was on entry.

    Re-enabling an adapter after the reference pass (PEFT's ``set_adapter``, or leaving ``disable_adapter``)
    marks every parameter of the active adapter trainable, the LoRA weights the freeze policy froze in the
    vision tower included: they would then get gradients, and checkpointed layers recompute with different
    metadata and raise. Entered before the adapter context, so it restores after the adapter is back.
    """
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def with_row_index(dataset: Any, key: str, rows: list[int] | None = None) -> Any:
    """``dataset`` with each row's index in the user's data under ``key``, so findings name that row.

    ``rows``: the row of the user's file each position holds (an adapter that left rows out before loading);
    positions stand in when they are unknown or do not match the dataset's length.
    """
    from datasets import Dataset

    if isinstance(dataset, Dataset) and key not in dataset.column_names:
        known = rows is not None and len(rows) == len(dataset)
        return dataset.add_column(key, list(rows) if known else list(range(len(dataset))))
    return dataset
