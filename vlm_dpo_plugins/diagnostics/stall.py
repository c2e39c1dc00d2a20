"""Nothing trains: the loss pinned at ln 2 with zero margins, or trainable groups that get no gradient.

Both symptoms share their causes (identical pairs, a mask hiding a response, no path
for the gradient, a beta too small to see), so one detector reports whichever shows
first and names the cause from what it can see: the last batch, the last step's
gradients and beta.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from vlm_dpo_plugins.diagnostics.batch import BatchFacts
from vlm_dpo_plugins.diagnostics.gradients import NO_GRADIENT, GradientWatch
from vlm_dpo_plugins.types import Finding, PluginState, Severity

LN2 = math.log(2)
LN2_STALL = "loss-stuck-at-ln2"
SMALL_BETA = 0.01


class NothingTrainsDetector:
    def __init__(self, steps: int, tolerance: float) -> None:
        self.steps = steps
        self.tolerance = tolerance
        self.stalled_logs = 0
        self.reported = False

    def observe(
        self,
        step: int,
        metrics: Mapping[str, float],
        gradients: GradientWatch | None = None,
        look_at_batch: Callable[[], BatchFacts | None] | None = None,
        beta: float | None = None,
    ) -> Finding | None:
        if "loss" in metrics:
            margin = metrics.get("rewards/margins", 0.0)
            at_ln2 = abs(metrics["loss"] - LN2) < self.tolerance and abs(margin) < self.tolerance
            self.stalled_logs = self.stalled_logs + 1 if at_ln2 else 0
        if self.reported:
            return None
        starved = gradients.starved_groups() if gradients is not None else []
        if self.stalled_logs >= self.steps:
            observed = (
                f"the loss has stayed at ln 2 = {LN2:.4f} with reward margins ~0 for {self.stalled_logs} logged "
                "steps: the policy is not moving away from the reference"
            )
            code = LN2_STALL
        elif starved:
            observed = (
                f"trainable parameter group(s) {', '.join(starved)} received no usable gradient for "
                f"{gradients.steps}+ optimizer steps in a row"
            )
            code = NO_GRADIENT
        else:
            return None
        self.reported = True
        cause, fix = explain(gradients, look_at_batch() if look_at_batch else None, beta)
        return Finding(
            code=code,
            severity=Severity.WARNING,
            message=f"{observed} (step {step}). {cause}",
            fix=fix,
            source="diagnostics",
            step=step,
        )

    def state(self) -> PluginState:
        return {"stalled_logs": self.stalled_logs, "reported": self.reported}

    def load(self, state: Mapping[str, object]) -> None:
        self.stalled_logs = int(state.get("stalled_logs", 0))
        self.reported = bool(state.get("reported", False))


def explain(gradients: GradientWatch | None, batch: BatchFacts | None, beta: float | None) -> tuple[str, str]:
    """The likely cause and its fix, most specific evidence first."""
    evidence = []
    if batch is not None:
        evidence.append(batch.describe())
    if gradients is not None and gradients.steps_seen:
        evidence.append(gradients.describe())
    seen = ("Seen: " + "; ".join(evidence) + ". ") if evidence else ""
    if batch is not None and batch.identical_pairs and batch.identical_pairs * 2 >= batch.pairs:
        return (
            seen + "Likely cause: chosen and rejected are identical after tokenization (both columns mapped to the "
            "same field, or a template that drops the response), so every margin is 0",
            "fix the data (run `vlm-dpo doctor --data FILE`); keep collation.identical-pair at 'error' or set it "
            "to 'skip'",
        )
    if batch is not None and batch.masked_responses:
        return (
            seen + "Likely cause: the label/completion mask hides whole responses (a template or truncation "
            "problem), so those pairs give the same log-probability on both sides",
            "mask only the prompt (labels -100 / completion_mask 0 up to the response); raise max_length if "
            "truncation removed the responses; keep collation.response-masked at 'error'",
        )
    if gradients is not None and gradients.steps_seen and (gradients.last_total is None or gradients.last_missing):
        return (
            seen + "Likely cause: no gradient path: the trained parameters are not in the graph of the loss "
            "(requires_grad off, features detached or computed under no_grad, or gradient checkpointing with "
            "frozen embeddings and no input gradients)",
            "check freeze.trainable and that the LoRA adapter is the active, trainable one; with gradient "
            "checkpointing call model.enable_input_require_grads() (the adapters do) or use non-reentrant "
            "checkpointing (guards.non_reentrant_checkpointing)",
        )
    if beta is not None and beta < SMALL_BETA:
        return (
            seen + f"Likely cause: beta = {beta:g} is so small that the rewards beta*(log-ratio) stay ~0",
            "use beta 0.1 (0.05..0.5 is usual for DPO)",
        )
    if gradients is not None and gradients.last_zero and gradients.nothing_receives_gradient:
        return (
            seen + "Likely cause: the two responses of each pair give the same log-probability (identical "
            "responses after truncation, or a mask covering them)",
            "run `vlm-dpo doctor --data FILE --model PATH` to find the rows; raise max_length",
        )
    return (
        seen + "Possible causes: identical or near-identical pairs, a mask covering a response, a beta too small, "
        "or trainable parameters without gradients",
        "run `vlm-dpo doctor --data FILE --config FILE`; check beta and freeze.trainable",
    )
