"""The DPO step every Trainer-based framework shares: policy pass, reference pass, loss, metrics.

An adapter hands over its framework's collated batch (2B rows, chosen first) as model inputs, the ids
to score and the response mask, and says only how its framework runs a forward (``forward``: fused
log-probs in TRL, logits in LLaMA-Factory and ms-swift) and which model with which contexts is the
reference (``reference_model``: a separate copy, or the policy with its adapter off). The rest is here:
the extra rows a loss variant reads (mDPO), prompt and image sharing around both passes, the summed
log-probs, ``vlm_dpo_compute_loss``, and the metrics every framework logs under the same names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.losses.compute import compute_preference_loss
from vlm_dpo_plugins.losses.extra_rows import ExtraRows, extend_batch, resolve
from vlm_dpo_plugins.losses.logprobs import SequenceLogps
from vlm_dpo_plugins.sharing.features import ReferenceFeatureReuse
from vlm_dpo_plugins.sharing.forward import PairSharing, PreparedBatch
from vlm_dpo_plugins.types import LossInputs, LossOutput, PreferenceLogps

Forward = Callable[[Any, PreparedBatch, dict[str, Any]], tuple[SequenceLogps, Any]]
"""``forward(model, prepared, batch)``: summed log-probs of the batch's rows in the collated layout, and the
model's output (for the framework's own metrics)."""


def loss_inputs(plugins: Any, loss_type: str) -> LossInputs:
    """What the loss variant reads beyond the policy's log-probs (the reference's, extra rows), checked."""
    needs = plugins.hook.vlm_dpo_loss_inputs(loss_type=loss_type) or LossInputs()
    if not isinstance(needs, LossInputs):
        raise ConfigError(f"vlm_dpo_loss_inputs({loss_type!r}) returned {type(needs).__name__}, not LossInputs")
    return needs


@dataclass
class StepInputs:
    """One collated batch as the step reads it, in the framework's 2B-row layout (chosen rows first)."""

    inputs: dict[str, Any]
    """The model's keyword arguments (loss-variant rows appended)."""
    labels: torch.Tensor
    response_mask: torch.Tensor
    batch: dict[str, Any]
    """The whole batch, for a framework's forward that reads more than the model's inputs."""
    pairs: int
    forward: Forward
    reference_forward: Forward | None = None
    """The reference pass's forward, when it differs from the policy's (default: ``forward``)."""
    precomputed_reference: SequenceLogps | None = None
    """The reference log-probs the batch carried (``sharing.reference: precompute``)."""


@dataclass
class StepResult:
    output: LossOutput
    logps: PreferenceLogps
    outputs: Any
    """The policy forward's output, for metrics only the framework logs."""
    prepared: PreparedBatch
    pairs: int


class PreferenceStep:
    """The loss path of one trainer: built once after the framework's trainer, called once per batch."""

    def __init__(
        self,
        plugins: Any,
        config: VLMDPOConfig,
        model: Any,
        groups: Any,
        *,
        framework_computes_loss: bool,
        reference_model: Any,
        reference_pass: bool,
        unwrap: Callable[[Any], Any],
        features_replayable: bool = True,
    ) -> None:
        self.plugins = plugins
        self.config = config
        self.model = model
        self.unwrap = unwrap
        needs = LossInputs()
        self.extra_rows: tuple[ExtraRows, ...] = ()
        if not framework_computes_loss:
            needs = loss_inputs(plugins, config.loss.type)
            self.extra_rows = resolve(plugins, needs, config.loss.type)
        self.needs: LossInputs = needs
        self.reference_pass = reference_pass and needs.reference
        self.sharing: PairSharing | None = None
        self.feature_reuse: ReferenceFeatureReuse | None = None
        sharing = config.section("sharing")
        # The framework's own loss runs its own forwards; extra rows repeat the chosen rows with other inputs.
        if (
            framework_computes_loss
            or self.extra_rows
            or sharing is None
            or not (sharing.prompt or sharing.vision_features)
        ):
            return
        self.sharing = PairSharing(model, sharing)
        # Under the vision lockstep every pass with images runs the vision tower, as it does on the other ranks.
        if self.reference_pass and sharing.vision_features and features_replayable:
            reference = None if reference_model is None else unwrap(reference_model)
            self.feature_reuse = ReferenceFeatureReuse(model, reference, groups)

    def extend(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The collated batch with the loss variant's extra rows appended (unchanged when it reads none)."""
        return extend_batch(batch, self.extra_rows) if self.extra_rows else batch

    def run(
        self, model: Any, step: StepInputs, reference: Callable[[Any], tuple[Any, Sequence[Any]]] | None
    ) -> StepResult:
        """One batch; ``reference(model)`` gives the model and the contexts of the reference pass (not called when
        the batch carries its reference log-probs, nor for a variant that reads none)."""
        prepared = self.prepare(step.inputs, step.labels, step.response_mask)
        with self._policy_pass(prepared):
            policy, outputs = step.forward(model, prepared, step.batch)
        if self.sharing is not None and self.sharing.layout_ignored(prepared):
            prepared = self.prepare(step.inputs, step.labels, step.response_mask)
            with self._policy_pass(prepared):
                policy, outputs = step.forward(model, prepared, step.batch)
        reference_logps = step.precomputed_reference if self.needs.reference else None
        if reference_logps is not None:
            _require_same_rows(reference_logps, policy)
        elif self.reference_pass and reference is not None:
            reference_logps = self._reference_pass(model, step, prepared, reference)
        output, logps = compute_preference_loss(
            self.plugins, self.config, policy, reference_logps, pairs=step.pairs, extra_rows=self.extra_rows
        )
        return StepResult(output, logps, outputs, prepared, step.pairs)

    def reference_only(
        self, model: Any, step: StepInputs, reference: Callable[[Any], tuple[Any, Sequence[Any]]]
    ) -> SequenceLogps:
        """The reference pass alone (``sharing.reference: precompute``): packed rows, images encoded once per pair."""
        prepared = self.prepare(step.inputs, step.labels, step.response_mask)
        if self.sharing is not None:
            self.sharing.features.forget()  # nothing recorded by a policy pass is replayed into this one
        logps = self._reference_pass(model, step, prepared, reference)
        if self.sharing is not None and self.sharing.layout_ignored(prepared):
            prepared = self.prepare(step.inputs, step.labels, step.response_mask)
            logps = self._reference_pass(model, step, prepared, reference)
        return logps

    def _reference_pass(
        self,
        model: Any,
        step: StepInputs,
        prepared: PreparedBatch,
        reference: Callable[[Any], tuple[Any, Sequence[Any]]],
    ) -> SequenceLogps:
        reference_model, contexts = reference(model)
        separate = None if reference_model is self.model else self.unwrap(reference_model)
        shared = self.sharing.reference_pass(prepared, reference_model=separate) if self.sharing else None
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for context in (*contexts, shared or contextlib.nullcontext()):
                stack.enter_context(context)
            logps, _ = (step.reference_forward or step.forward)(reference_model, prepared, step.batch)
        return logps

    def prepare(self, kwargs: dict[str, Any], labels: torch.Tensor, response_mask: torch.Tensor) -> PreparedBatch:
        if self.sharing is None:
            return PreparedBatch(dict(kwargs), labels, packed=None, encode_chosen_half=False)
        return self.sharing.prepare(kwargs, labels, response_mask)

    @contextlib.contextmanager
    def _policy_pass(self, prepared: PreparedBatch):
        if self.sharing is None:
            yield
            return
        keep = self.feature_reuse is not None and self.feature_reuse.allowed()
        with self.sharing.policy_pass(prepared, keep_features=keep):
            yield


def _require_same_rows(reference: SequenceLogps, policy: SequenceLogps) -> None:
    """The precomputed entries must describe this batch's rows: the same responses, token for token."""
    counts = reference.token_counts.to(policy.token_counts.device)
    if counts.shape != policy.token_counts.shape or not torch.equal(counts.long(), policy.token_counts.long()):
        raise ConfigError(
            "sharing.reference: the precomputed reference log-probs of this batch were computed for responses of "
            f"{counts.long().tolist()} tokens, but its responses have {policy.token_counts.long().tolist()}: the "
            "collated rows changed after the pass (a collator that is not deterministic?); set "
            "sharing.reference: live"
        )


def preference_metrics(
    output: LossOutput, logps: PreferenceLogps, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> dict[str, float]:
    """``rewards/*``, ``logps/*`` and the variant's own terms, as every framework names them.

    ``gather``: averaged over ranks (TRL, ms-swift gather their own this way); None: this rank's means
    (LLaMA-Factory averages logged values over ranks itself).
    """
    collect = gather or (lambda tensor: tensor)
    chosen, rejected = (
        collect(output.chosen_rewards.detach().float()),
        collect(output.rejected_rewards.detach().float()),
    )
    metrics = {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "logps/chosen": collect(logps.chosen.detach().float()).mean().item(),
        "logps/rejected": collect(logps.rejected.detach().float()).mean().item(),
    }
    own = {name: value for name, value in output.metrics.items() if not name.startswith("rewards/")}
    if own and gather is not None:
        values = gather(torch.tensor(list(own.values()), dtype=torch.float32, device=output.losses.device)[None])
        own = dict(zip(own, values.mean(dim=0).tolist()))
    metrics.update({name: float(value) for name, value in own.items()})
    return metrics
