"""The hook specifications: the whole contract between the core, the plugins and the adapters.

Adapters call these hooks from inside their framework's training loop; plugins
implement them with ``@vlm_dpo_plugins.hookimpl``. Every argument is a tensor, a
module, a name, a plain dict or one of the dataclasses in ``vlm_dpo_plugins.types``,
never a framework object, so one plugin serves TRL, LLaMA-Factory and ms-swift alike.

Calling conventions (pluggy):
- ``firstresult=True``: one plugin decides; the first non-None answer wins, and a
  plugin that wants to decide first marks itself ``tryfirst=True``.
- plain hooks: every plugin contributes and the caller gets a list.
- ``wrapper=True`` implementations surround another hook's call (``result = yield``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vlm_dpo_plugins.markers import hookspec

if TYPE_CHECKING:
    import torch

    from vlm_dpo_plugins.collation.checkers import PairCheckers
    from vlm_dpo_plugins.config import VLMDPOConfig
    from vlm_dpo_plugins.losses.extra_rows import ExtraRows
    from vlm_dpo_plugins.types import (
        Finding,
        GradNorms,
        LossInputs,
        LossOutput,
        ParameterGroups,
        PluginState,
        PreferenceLogps,
        RunContext,
        StepSignals,
        TokenizedPair,
    )

    LossFunction = Callable[[PreferenceLogps, Any], LossOutput]


# ---------------------------------------------------------------------------
# configuration and lifecycle
# ---------------------------------------------------------------------------


@hookspec
def vlm_dpo_config_sections() -> Mapping[str, type]:
    """Return extra top-level config sections this plugin reads, as ``{name: dataclass type}``."""


@hookspec
def vlm_dpo_configure(config: VLMDPOConfig) -> None:
    """Called once with the validated config before training is set up; raise ``ConfigError`` to refuse it."""


@hookspec
def vlm_dpo_train_begin(model: torch.nn.Module, context: RunContext) -> None:
    """Called once the model, optimizer and data are ready, before the first step."""


@hookspec
def vlm_dpo_step_begin(step: int, model: torch.nn.Module) -> None:
    """Called at the start of every optimizer step (``step`` counts optimizer steps from 0)."""


@hookspec
def vlm_dpo_train_end(context: RunContext, metrics: Mapping[str, float]) -> None:
    """Called once after the last step with the final logged metrics."""


# ---------------------------------------------------------------------------
# freeze policy
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def vlm_dpo_classify_parameters(model: torch.nn.Module, model_type: str | None) -> ParameterGroups | None:
    """Sort every parameter name into ``vision``/``projector``/``language``/``other``; first answer wins."""


@hookspec(firstresult=True)
def vlm_dpo_trainable_parameters(groups: ParameterGroups, step: int) -> set[str] | None:
    """Return the names of the parameters that should train at optimizer step ``step``; first answer wins."""


@hookspec(firstresult=True)
def vlm_dpo_optimizer_groups(
    groups: ParameterGroups, trainable: set[str], base_learning_rate: float
) -> list[dict[str, Any]] | None:
    """Return ``[{"names": [...], "lr": float, "group": str}]``, names empty until a stage unfreezes; first wins."""


@hookspec(firstresult=True)
def vlm_dpo_lora_target_modules(model: torch.nn.Module, groups: ParameterGroups) -> list[str] | None:
    """Return the module names LoRA should wrap (never frozen groups or conv patch embeddings); first answer wins."""


# ---------------------------------------------------------------------------
# collation
# ---------------------------------------------------------------------------


@hookspec
def vlm_dpo_check_example(example: Mapping[str, Any], row: int) -> Sequence[Finding]:
    """Check one raw dataset row (fields, image paths, image count) before tokenization."""


@hookspec
def vlm_dpo_check_pair(pair: TokenizedPair) -> Sequence[Finding]:
    """Check one preference pair after tokenization (ids, response masks, image token needs) in neutral form."""


@hookspec
def vlm_dpo_check_batch(batch: Mapping[str, torch.Tensor], step: int) -> Sequence[Finding]:
    """Look at each training batch of 2B rows (chosen rows first, then rejected) before its forward pass."""


@hookspec(firstresult=True)
def vlm_dpo_collate(
    examples: list[Mapping[str, Any]], collate: Callable[[list[Mapping[str, Any]]], dict[str, Any]], checks: PairCheckers
) -> dict[str, Any] | None:
    """Build a batch from ``examples`` with the framework's ``collate``; ``checks`` runs every plugin's checks."""


# ---------------------------------------------------------------------------
# loss variants
# ---------------------------------------------------------------------------


@hookspec
def vlm_dpo_loss_functions() -> Mapping[str, LossFunction]:
    """Return the loss variants this plugin provides as ``{name: fn(logps, loss_config) -> LossOutput}``."""


@hookspec(firstresult=True)
def vlm_dpo_loss_inputs(loss_type: str) -> LossInputs | None:
    """Return what variant ``loss_type`` needs (reference pass, token counts, ``extras`` keys); first answer wins."""


# The manager's own last answer calls the variant registered under ``config.loss.type``: a plugin that only adds a
# variant implements ``vlm_dpo_loss_functions``, and this hook (or a wrapper of it) changes every variant's result.
@hookspec(firstresult=True)
def vlm_dpo_compute_loss(logps: PreferenceLogps, config: VLMDPOConfig) -> LossOutput | None:
    """Compute the preference loss for a batch; the registered variant of ``config.loss.type`` answers last."""


# For each key of ``LossInputs.extras``: B rows built from the collated batch, run through the policy and the
# reference in the same forward as the pairs, and the extras keys their log-probs go under (mDPO's corrupted image).
@hookspec(firstresult=True)
def vlm_dpo_extra_rows(extras_key: str) -> ExtraRows | None:
    """Return how ``PreferenceLogps.extras[extras_key]`` is computed, as an ``ExtraRows``; first answer wins."""


# ---------------------------------------------------------------------------
# stability guards
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def vlm_dpo_clip_gradients(parameters: Mapping[str, Sequence[torch.nn.Parameter]]) -> GradNorms | None:
    """Clip gradients in place (parameters by group) and return the norms measured before clipping; first wins."""


@hookspec
def vlm_dpo_skip_step_reason(signals: StepSignals) -> str | None:
    """Return why this optimizer step must be skipped, or None; any reason on any rank skips it everywhere."""


@hookspec
def vlm_dpo_after_optimizer_step(signals: StepSignals, skipped: bool, reasons: Sequence[str]) -> None:
    """Called after the step was taken or skipped, with the reasons agreed across ranks."""


@hookspec(firstresult=True)
def vlm_dpo_learning_rate_scale(step: int) -> float | None:
    """Return the factor for every optimizer group's learning rate at this step (back-off; 1.0: none); first wins."""


@hookspec(firstresult=True)
def vlm_dpo_gradient_checkpointing_kwargs(context: RunContext) -> dict[str, Any] | None:
    """Return the ``gradient_checkpointing_kwargs`` to use for this run; first answer wins."""


@hookspec(firstresult=True)
def vlm_dpo_ddp_kwargs(context: RunContext) -> dict[str, Any] | None:
    """Return DistributedDataParallel arguments this run needs (``static_graph``, ...); empty: any; first wins."""


@hookspec
def vlm_dpo_deepspeed_overrides(
    deepspeed_config: Mapping[str, Any], trainable_parameters: int, hidden_size: int | None, context: RunContext
) -> Mapping[str, Any] | None:
    """Return DeepSpeed values for keys the user left unset or "auto", as dotted keys (``zero_optimization.x``)."""


# ---------------------------------------------------------------------------
# diagnostics and metrics
# ---------------------------------------------------------------------------


@hookspec
def vlm_dpo_on_log(step: int, metrics: Mapping[str, float]) -> Sequence[Finding]:
    """Look at every logged metric dict and return findings (each detector warns once per cause)."""


@hookspec
def vlm_dpo_metrics(step: int) -> Mapping[str, float]:
    """Return this plugin's metrics for the log line after ``step`` optimizer steps (the Trainer's global_step)."""


@hookspec
def vlm_dpo_state_dict() -> tuple[str, PluginState] | None:
    """Return ``(key, state)`` to save in checkpoints (skip counters, detectors); a key taken twice is an error."""


@hookspec
def vlm_dpo_load_state_dict(states: Mapping[str, PluginState]) -> None:
    """Restore state saved by ``vlm_dpo_state_dict`` when a run resumes; read your own key."""
