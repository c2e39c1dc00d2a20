"""``PluginTrainerMixin``: the DPO step every ``transformers.Trainer``-based framework shares, in its own loop.

    class VLMDPOTrainer(PluginTrainerMixin, trl.DPOTrainer): ...
    class PluginDPOTrainer(PluginTrainerMixin, CustomDPOTrainer): ...   # LLaMA-Factory, ms-swift

The framework's trainer builds the model, reference, collator, arguments and loop. The adapter's subclass calls
``vlm_dpo_bind(run)`` first and ``vlm_dpo_attach()`` at the end of its ``__init__``, runs ``vlm_dpo_step`` in its
framework's loss method, and answers the binding methods below.

When what runs (lifecycle, in order), and what the plugins do then:

- the framework's trainer is built, ``vlm_dpo_attach``: freeze policy applied, DeepSpeed buckets tuned into the
  config accelerate builds the engine from, collator wrapped in the collation hooks, the DPO step bound;
- the optimizer is built, ``create_optimizer``: one param group per freeze group with its learning rate;
- ``train()`` starts, ``vlm_dpo_resume`` and ``vlm_dpo_prescan``: plugin state restored from a complete
  checkpoint; every row pre-scanned, skipped rows left out;
- the loop starts, ``vlm_dpo_train_begin``: ``optimizer.step`` replaced by the guarded step; with
  ``sharing.reference: precompute``, the reference pass over the training set, then a separate reference released;
- each optimizer step starts, ``vlm_dpo_step_begin``: progressive unfreezing;
- each batch, ``training_step`` and ``compute_loss``: ``vlm_dpo_check_batch``; the loss kept for the guards' vote;
- each log, ``log``: the plugins' metrics added; the logged dict to the detectors;
- each checkpoint, ``_save_checkpoint``: the plugins' state next to the Trainer's; the folder marked incomplete
  until both are written;
- the loop ends, ``vlm_dpo_train_end``;
- ``train()`` returns (or raises), ``vlm_dpo_train_returns``: the DDP wrapper freed while its process group is
  still alive; after a completed run, the process group destroyed at exit, before interpreter shutdown, unless
  the framework did it (``ddp_teardown.py``).

The binding (what an adapter answers): ``vlm_dpo_step_inputs`` (a collated batch as the step reads it: model
inputs, labels, response mask, forward), ``vlm_dpo_reference_model`` (the reference pass's model and contexts),
``vlm_dpo_training_rows`` (the training set as the pre-scan reads it), ``vlm_dpo_framework_optimizer`` (why the
framework must build the optimizer, if it must), ``vlm_dpo_frozen_group_hint`` (what to tell a user whose group
stays frozen), ``vlm_dpo_context`` (the run's facts). ``_save_checkpoint``, ``_load_from_checkpoint`` and
``_get_grad_norm`` are the Trainer's private methods: it has no public moment around a checkpoint's files, nor for
the norm it logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from vlm_dpo_plugins.adapters.hf_trainer.checkpoint_choice import choose_checkpoint, mark_saved, mark_saving
from vlm_dpo_plugins.adapters.hf_trainer.checkpoint_format import reload_if_keys_were_renamed, runtime_format_saves
from vlm_dpo_plugins.adapters.hf_trainer.checkpoint_state import collect_state, read_state, write_state
from vlm_dpo_plugins.adapters.hf_trainer.ddp_teardown import release_ddp_wrapper, tear_down_before_interpreter_exit
from vlm_dpo_plugins.adapters.hf_trainer.optimizer_choice import PASSED_IN, framework_builds_optimizer
from vlm_dpo_plugins.adapters.hf_trainer.optimizer_step import GuardedOptimizerStep
from vlm_dpo_plugins.adapters.hf_trainer.preference_step import (
    PreferenceStep,
    StepInputs,
    StepResult,
)
from vlm_dpo_plugins.adapters.hf_trainer.prescan import TrainingRows, prescan
from vlm_dpo_plugins.adapters.hf_trainer.reference_precompute import (
    check_precompute,
    precompute_reference,
    release_reference,
)
from vlm_dpo_plugins.adapters.hf_trainer.run import PluginRun
from vlm_dpo_plugins.adapters.hf_trainer.sharded_resume import (
    loads_fsdp2_sharded_optimizer,
    sharded_optimizer_read_by_name,
)
from vlm_dpo_plugins.adapters.hf_trainer.staged_groups import DeepSpeedStages
from vlm_dpo_plugins.adapters.hf_trainer.trainable import TrainableState

from vlm_dpo_plugins.collation.accounting import RowAccount
from vlm_dpo_plugins.collation.file_checks import CheckedFiles
from vlm_dpo_plugins.collation.wrapper import HookedCollator
from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.errors import VLMDPOError
from vlm_dpo_plugins.freeze.names import named_parameters
from vlm_dpo_plugins.freeze.optimizer import optimizer_param_groups, unfreeze_into_optimizer
from vlm_dpo_plugins.freeze.report import trainable_report
from vlm_dpo_plugins.guards.deepspeed import tune_deepspeed_config
from vlm_dpo_plugins.guards.deepspeed_buckets import model_hidden_size
from vlm_dpo_plugins.guards.deepspeed_live import describe_live_buckets
from vlm_dpo_plugins.guards.step import StepOutcome
from vlm_dpo_plugins.guards.vision_lockstep import VisionLockstep, needs_lockstep
from vlm_dpo_plugins.losses.logprobs import SequenceLogps
from vlm_dpo_plugins.runlog.findings import append_finding
from vlm_dpo_plugins.sharing.reference_cache import ReferenceAttach, take_attached
from vlm_dpo_plugins.types import Finding, ParameterGroups, RunContext

logger = logging.getLogger("vlm_dpo_plugins.adapters")


class PluginTrainerMixin:
    plugins: Any
    vlm_dpo_config: VLMDPOConfig
    _vlm_dpo_run: Any
    _optimizer_passed_in = False
    framework_limits_every_parameter = False
    """True: the policy may only narrow what the framework made trainable (``trainable.py``)."""
    vlm_dpo_checked_files: CheckedFiles | None = None
    """The training files the adapter checked before its framework read them (LLaMA-Factory, ms-swift)."""
    _vision_lockstep: VisionLockstep | None = None
    _deepspeed_stages: DeepSpeedStages | None = None
    """Unfreeze stages under DeepSpeed: in the optimizer from the start, inert until their step."""
    _resumed_step = 0

    def vlm_dpo_bind(self, run: PluginRun) -> None:
        """Before the framework's ``__init__``: the plugin run (plugins, agreed config, checked files) served."""
        self.plugins, self.vlm_dpo_config, self._vlm_dpo_run = run.plugins, run.config, run
        self.vlm_dpo_checked_files = run.checked_files

    # -- the binding: what an adapter answers ------------------------------------------------

    def vlm_dpo_step_inputs(self, batch: dict[str, Any]) -> StepInputs:
        """A collated batch as the DPO step reads it, the loss variant's rows appended (``vlm_dpo_step.extend``)."""
        raise NotImplementedError(f"{type(self).__name__} must say how the step reads its framework's batch")

    def vlm_dpo_reference_model(self, model: Any) -> tuple[Any, list[Any]]:
        """The model of the reference pass and the contexts to run it in, given the model the step runs.

        By default the framework's reference model, else the policy with its PEFT adapter disabled.
        """
        if self.ref_model is not None:
            return self.ref_model, []
        # Leaving PEFT's disable_adapter re-marks the adapters trainable, the ones the policy froze included.
        return model, [requires_grad_kept(model), self.accelerator.unwrap_model(model).disable_adapter()]

    def vlm_dpo_training_rows(self) -> TrainingRows:
        """The training set as the pre-scan reads it (a ``datasets.Dataset`` unless the adapter says otherwise)."""
        return TrainingRows(self.train_dataset, self._row_index_key())

    def vlm_dpo_framework_optimizer(self) -> str | None:
        """Why the framework must build the optimizer itself (per-group learning rates then do not apply)."""
        return None

    def vlm_dpo_frozen_group_hint(self, group: str) -> str:
        """What to tell a user whose policy trains ``group`` while the framework made none of it trainable."""
        return "Check the framework's own freeze and LoRA target settings."

    def vlm_dpo_context(self) -> RunContext:
        """The run's facts with the model's type."""
        return dataclasses.replace(self._vlm_dpo_run.context, model_type=getattr(self.model.config, "model_type", None))

    # -- the framework's trainer is built --------------------------------------------------------

    def vlm_dpo_attach(self, *, framework_computes_loss: bool, reference_pass: bool = True) -> None:
        """Called at the end of the adapter's ``__init__``, once the framework built model, reference and collator."""
        self.vlm_dpo_findings: list[Finding] = []
        # The loss variant's own terms logged so far (mdpo/anchor_loss): a framework whose log line holds a fixed
        # set of keys learns from them which of ours to keep.
        self.vlm_dpo_loss_terms: set[str] = set()
        self._events_reported = 0
        context = self.vlm_dpo_context()
        self._trainable = TrainableState(
            self.plugins,
            self.model,
            limits_every_parameter=self.framework_limits_every_parameter,
            # DDP, FSDP2 and DeepSpeed (FSDP1 refuses unfreeze stages): what they wrapped never changes.
            hold_later_stages=context.is_distributed or context.uses_deepspeed,
        )
        self._trainable.apply(step=0)
        freeze = self.vlm_dpo_config.section("freeze")
        if freeze is not None:
            self._trainable.warn_about_groups_kept_frozen(freeze.groups_ever_trained(), self.vlm_dpo_frozen_group_hint)
        self._learning_rates: dict[str, float] = {}
        self._resumed_from_stock_checkpoint = False
        self._tune_deepspeed(self.vlm_dpo_context())
        self._framework_collator = self.data_collator
        self._reference_released = False
        self.vlm_dpo_step = PreferenceStep(
            self.plugins,
            self.vlm_dpo_config,
            self.model,
            self.vlm_dpo_groups,
            framework_computes_loss=framework_computes_loss,
            reference_model=self.ref_model,
            reference_pass=reference_pass,
            unwrap=self.accelerator.unwrap_model,
            features_replayable=not self._lockstep_wanted(context),
        )
        precompute = check_precompute(
            self.vlm_dpo_config,
            framework=self._vlm_dpo_run.context.framework,
            framework_computes_loss=framework_computes_loss,
            step=self.vlm_dpo_step,
        )
        # Inside the collation hooks: it sees exactly the examples the framework's collator gets, in batch order.
        self._reference_attach = ReferenceAttach(self.data_collator) if precompute else None
        self.data_collator = self._reference_attach or self.data_collator
        if self.vlm_dpo_config.section("collation") is not None:
            self.data_collator = HookedCollator(self.plugins, self.data_collator)
        self._scan_skipped_rows: list[int] | None = None
        self._loaded_rows = len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else None
        self._guarded_step = GuardedOptimizerStep(
            self.plugins,
            parameters=self._trainable.by_group,
            before_step=self._trainable.drop_held_gradients,
            current_step=lambda: self.state.global_step,
            save_checkpoint=self._save_checkpoint_now,
            report_grad_norm=self._fill_logged_grad_norm,
        )
        self._logged_grad_norm: torch.Tensor | None = None
        self.add_callback(PluginLifecycle(self))

    @property
    def vlm_dpo_groups(self) -> ParameterGroups:
        """Every parameter name by freeze group (vision, projector, language, other)."""
        return self._trainable.groups

    @property
    def vlm_dpo_step_outcomes(self) -> list[StepOutcome]:
        """What the guarded optimizer step did at each step so far (taken or skipped, the reasons, the norms)."""
        return self._guarded_step.outcomes

    def announce(self, framework: str, origin: str, loss: str) -> None:
        """The start line: where the settings came from, the loss, beta and what trains, group by group."""
        report = trainable_report(self.vlm_dpo_groups, self.model)
        trainable = ", ".join(
            f"{group} {int(numbers['trainable']):,}/{int(numbers['parameters']):,}" for group, numbers in report.items()
        )
        section = self.vlm_dpo_config.section("loss")
        logger.info(
            "vlm-dpo: active in %s's DPO trainer (settings from %s): loss %s, beta %s; trainable: %s",
            framework,
            origin,
            loss,
            section.beta if section is not None else f"{framework}'s",
            trainable,
        )

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

    def _row_index_key(self) -> str | None:
        """The example key naming each row for the collation checks; None with them blocked (no column added)."""
        collation = self.vlm_dpo_config.section("collation")
        return collation.row_index_key if collation is not None else None

    # -- the optimizer is built ---------------------------------------------------------

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            if self._optimizer_passed_in:
                logger.warning("vlm-dpo: %s", PASSED_IN)
            return self.optimizer  # passed in, or built here already (DeepSpeed's set-up asks first, the loop again)
        framework_builds, warning = framework_builds_optimizer(
            self.args,
            resumed_from_stock_checkpoint=self._resumed_from_stock_checkpoint,
            framework_reason=self.vlm_dpo_framework_optimizer(),
        )
        if warning is not None:
            logger.warning("vlm-dpo: %s", warning)
        if framework_builds:
            return super().create_optimizer(model)
        trainable = {name for name, p in named_parameters(self.model) if self._trainable.is_trained(name, p)}
        freeze = self.vlm_dpo_config.section("freeze")
        if self.is_deepspeed_enabled and freeze is not None and freeze.unfreeze:
            stage_steps = [stage.at_step for stage in freeze.unfreeze]
            self._deepspeed_stages = DeepSpeedStages(self._trainable.policy_wants, stage_steps)
            trainable -= self._deepspeed_stages.names
        optimizer_groups = self.plugins.hook.vlm_dpo_optimizer_groups(
            groups=self.vlm_dpo_groups, trainable=trainable, base_learning_rate=self.args.learning_rate
        )
        if optimizer_groups is None:
            return super().create_optimizer(model)
        self._learning_rates = {entry["group"]: entry["lr"] for entry in optimizer_groups}
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        param_groups = optimizer_param_groups(self.model, optimizer_groups, weight_decay=self.args.weight_decay)
        if self._deepspeed_stages is not None:
            # DeepSpeed cannot partition an empty group (a later stage's group the freeze plugin lists from step 0).
            param_groups = [group for group in param_groups if group["params"]]
            param_groups += self._deepspeed_stages.param_groups(
                self.model,
                self.vlm_dpo_groups,
                self._learning_rates,
                self.args.learning_rate,
                self.args.weight_decay,
                next_step=self._resumed_step,
            )
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # -- train() starts ---------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        checkpoint = choose_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            self.vlm_dpo_resume(checkpoint)
        self.vlm_dpo_prescan()
        try:
            output = super().train(checkpoint, *args, **kwargs)
        except BaseException:
            self.vlm_dpo_train_returns(completed=False)
            raise
        self.vlm_dpo_train_returns(completed=True)
        return output

    def vlm_dpo_train_returns(self, completed: bool) -> None:
        """``train()`` returns or raises: the DDP wrapper freed while its process group is alive; after a completed
        run, the process group destroyed before interpreter shutdown unless the framework did it (``ddp_teardown``)."""
        if self._vision_lockstep is not None:
            self._vision_lockstep.remove()
        if self._deepspeed_stages is not None:
            self._deepspeed_stages.remove()
        if release_ddp_wrapper(self):
            logger.debug("vlm-dpo: DDP wrapper released at the end of train()")
        if completed:
            tear_down_before_interpreter_exit()

    def vlm_dpo_resume(self, checkpoint: str) -> None:
        """Before the optimizer exists: the plugins' state and the freeze stage of the checkpoint's step."""
        from transformers.trainer_callback import TrainerState

        states = read_state(checkpoint, self.args.process_index)
        # A checkpoint written without the plugins holds an optimizer with the Trainer's param groups; ours must
        # match it to load.
        self._resumed_from_stock_checkpoint = states is None
        if states is not None:
            self.plugins.hook.vlm_dpo_load_state_dict(states=states)
            self._scan_skipped_rows = states.get("adapter", {}).get("scan_skipped_rows")
        step = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json")).global_step
        self._resumed_step = step
        # So the optimizer is built with the parameters of the last step taken, as the saved state expects; a stage
        # at ``step`` itself starts when that step begins, as in the uninterrupted run.
        self._trainable.apply(max(step - 1, 0))

    def vlm_dpo_prescan(self) -> None:
        """Every training row through the collator and the checks; the rows left out; one line accounting for all."""
        self.train_dataset, skipped = prescan(
            self.plugins,
            self.vlm_dpo_config,
            self.vlm_dpo_training_rows(),
            self._framework_collator,
            batch_size=self.args.per_device_train_batch_size,
            output_dir=self.args.output_dir,
            skipped=self._scan_skipped_rows,
        )
        if skipped is not None:
            self._scan_skipped_rows = skipped
        files = self.vlm_dpo_checked_files
        if files is None or not files.source or self._loaded_rows is None:
            return
        RowAccount(
            source=files.source,
            framework=files.framework,
            rows_in=files.rows_in,
            skipped_by_file_checks=files.skipped_before_loading,
            loaded=self._loaded_rows,
            skipped_by_prescan=None if skipped is None else len(skipped),
        ).log(logger)

    # -- the loop starts, each optimizer step starts, the loop ends (``PluginLifecycle``) --------------------

    def vlm_dpo_train_begin(self) -> None:
        engine = self.model_wrapped if self.is_deepspeed_enabled else None
        self._guarded_step.install(self.optimizer, deepspeed_engine=engine, scaler=self.accelerator.scaler)
        live = describe_live_buckets(engine) if engine is not None else None
        if live is not None and self.is_world_process_zero():
            logger.info("vlm-dpo: %s", live)  # what the engine uses, read back after the framework built it
        # Before the reference pass: its forwards gather the vision weights on every rank too.
        if self._lockstep_wanted(self.vlm_dpo_context()):
            if self._vision_lockstep is not None:
                self._vision_lockstep.remove()
            self._vision_lockstep = VisionLockstep([self.model, self.ref_model])
        if self._reference_attach is not None and self._reference_attach.cache is None:
            self.vlm_dpo_precompute_reference()
        self.plugins.hook.vlm_dpo_train_begin(model=self.model, context=self.vlm_dpo_context())

    def _lockstep_wanted(self, context: RunContext) -> bool:
        return self.vlm_dpo_config.section("guards") is not None and needs_lockstep(context)

    def vlm_dpo_precompute_reference(self) -> None:
        """The reference over the training set, once; a separate reference model then leaves memory unless an
        evaluation set will need it."""
        precompute_reference(self, self._reference_attach)
        if self.eval_dataset is not None:
            logger.info("vlm-dpo: sharing.reference: the reference model stays loaded for the evaluation set")
        elif release_reference(self):
            self._reference_released = True
            logger.info("vlm-dpo: sharing.reference: the separate reference model is released from memory")

    def vlm_dpo_step_begin(self, step: int) -> None:
        newly = self._trainable.apply(step)
        if self._deepspeed_stages is not None:
            scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
            started = self._deepspeed_stages.begin_step(
                step, self.optimizer, scheduler, self._learning_rates, self.args.learning_rate
            )
            if started is not None:
                logger.warning("vlm-dpo: %s", started)
        elif newly and self.optimizer is not None:
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
            scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
            added = unfreeze_into_optimizer(
                self.model, optimizer, newly, self.vlm_dpo_groups, self._learning_rates, scheduler
            )
            logger.warning(
                "vlm-dpo: step %d: unfroze %s",
                step,
                ", ".join(f"{len(names)} {group} parameter(s)" for group, names in added.items()),
            )
        self.plugins.hook.vlm_dpo_step_begin(step=step, model=self.model)

    def vlm_dpo_train_end(self, metrics: dict[str, float]) -> None:
        self.plugins.hook.vlm_dpo_train_end(context=self.vlm_dpo_context(), metrics=metrics)

    # -- each batch -----------------------------------------------------------------------------

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        # The detectors keep a reference to the batch and look into it only to explain a stall.
        for findings in self.plugins.hook.vlm_dpo_check_batch(batch=inputs, step=self.state.global_step):
            self._keep_findings(findings)
        return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, *args: Any, **kwargs: Any):
        result = super().compute_loss(model, inputs, return_outputs, *args, **kwargs)
        if self.model.training:  # the guarded step votes on the window's losses
            self._guarded_step.record_loss(result[0] if return_outputs else result)
        return result

    def vlm_dpo_run_step(self, model: Any, batch: dict[str, Any]) -> StepResult:
        """The DPO step of one collated batch, with the reference it carries when it was precomputed."""
        attached = take_attached(batch)
        step = self.vlm_dpo_step_inputs(batch)
        if attached is not None:
            step.precomputed_reference = SequenceLogps(attached[:, 0].float(), attached[:, 1].long())
        return self.vlm_dpo_step.run(model, step, self._step_reference)

    def _step_reference(self, model: Any) -> tuple[Any, list[Any]]:
        if self._reference_released:
            raise VLMDPOError(
                "sharing.reference: precompute: this batch's reference log-probs are not in the cache (its pairs are "
                "not training pairs the pass saw, or changed since: a random transform in the data?) and the "
                "reference model was released after the pass; set sharing.reference: live"
            )
        return self.vlm_dpo_reference_model(model)

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

    # -- each log -------------------------------------------------------------------------------

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

    # -- each checkpoint ----------------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # Weights in the layout the Trainer's resume loads back (checkpoint_format.py).
        with runtime_format_saves(self.model):
            if trial is not None:
                return super()._save_checkpoint(model, trial)
            checkpoint_dir = self._checkpoint_dir()
            # Until the marker is gone, a resumed run will not pick this folder: a kill mid-save leaves it behind.
            mark_saving(checkpoint_dir, self.args.process_index)
            super()._save_checkpoint(model, trial)
        adapter_state = {"scan_skipped_rows": self._scan_skipped_rows, "global_step": self.state.global_step}
        write_state(checkpoint_dir, self.args.process_index, collect_state(self.plugins, adapter_state))
        mark_saved(checkpoint_dir, self.args.process_index)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        reading = contextlib.nullcontext()
        if checkpoint is not None and loads_fsdp2_sharded_optimizer(self):
            reading = sharded_optimizer_read_by_name()  # accelerate <= 1.11 reads none of it (sharded_resume.py)
        with reading:
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # A checkpoint in the hub layout (written without the plugins) loads back through from_pretrained.
        reload_if_keys_were_renamed(model if model is not None else self.model, resume_from_checkpoint)

    def _checkpoint_dir(self) -> str:
        return os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")

    def _save_checkpoint_now(self) -> str:
        """Called by the guards before they halt training: the weights of the last step taken, kept."""
        self._save_checkpoint(self.model_wrapped, trial=None)
        return self._checkpoint_dir()


class PluginLifecycle(TrainerCallback):
    """The Trainer's callback points, handed to the trainer's lifecycle methods of the same moment."""

    def __init__(self, trainer: PluginTrainerMixin) -> None:
        self.trainer = trainer
        self.last_logs: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.vlm_dpo_train_begin()

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.vlm_dpo_step_begin(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.last_logs = {key: float(v) for key, v in logs.items() if isinstance(v, (int, float))}

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.vlm_dpo_train_end(self.last_logs)


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


def with_row_index(dataset: Any, key: str | None, rows: list[int] | None = None) -> Any:
    """``dataset`` with each row's index in the user's data under ``key``, so findings name that row.

    ``rows``: the row of the user's file each position holds (an adapter that left rows out before loading);
    positions stand in when they are unknown or do not match the dataset's length.
    """
    from datasets import Dataset

    if key is not None and isinstance(dataset, Dataset) and key not in dataset.column_names:
        known = rows is not None and len(rows) == len(dataset)
        return dataset.add_column(key, list(rows) if known else list(range(len(dataset))))
    return dataset
