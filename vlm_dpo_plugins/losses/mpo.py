"""MPO (Wang et al. 2024, arXiv 2411.10442, InternVL's mixed preference optimization): three losses in one.

Per batch, ``w_p * preference + w_q * quality + w_g * generation`` (the paper: 0.8, 0.2, 1.0):
- preference: sigmoid DPO, ``-log sigmoid(beta h)``;
- quality: BCO-pair, each response classified on its own against a reward shift ``delta``,
  ``-log sigmoid(beta chosen_ratio - delta) - log sigmoid(-(beta rejected_ratio - delta))``;
- generation: the SFT loss of the chosen responses, ``-sum(chosen) / sum(chosen tokens)`` over the batch
  (a token mean over the batch's chosen responses, as TRL's and ms-swift's ``sft`` term).

``delta`` is BCO's running mean of the batches' mean implicit reward (the paper, LLaMA-Factory's
``pref_bco_weight`` and ms-swift's ``bco_pair``); TRL 1.x dropped it (``delta`` = 0), which
``mpo_running_baseline: false`` reproduces. The baseline is per run and the same on every rank: each
training batch's mean reward is averaged over the ranks in one collective before it moves the mean.
Unlike the frameworks' baselines it moves only with batches that train (an evaluation leaves it where it
was), a batch whose rewards are not finite leaves it too, and an optimizer step the guards skip takes back
what that step's batches did to it: the checkpoint of a run holds it, and a resumed run continues it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from vlm_dpo_plugins.distributed import sum_across_ranks
from vlm_dpo_plugins.errors import PluginError
from vlm_dpo_plugins.losses.functions import logistic_loss, preference_output
from vlm_dpo_plugins.losses.inputs import prepare
from vlm_dpo_plugins.losses.settings import LossConfig
from vlm_dpo_plugins.types import LossInputs, LossOutput, PreferenceLogps

MPO_INPUTS = LossInputs(token_counts=True)
STATE_KEY = "reward_baseline"


class RewardBaseline:
    """BCO's ``delta`` for one run: the running mean, over training batches and ranks, of the mean reward."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0
        self._at_step_begin = (0.0, 0)

    def update(self, batch_rewards: torch.Tensor) -> float:
        """Move the mean by this batch's mean reward on every rank (a collective: every rank calls it); the mean."""
        total, ranks = sum_across_ranks([batch_rewards.float().mean().item(), 1.0])
        if math.isfinite(total):  # the same sum on every rank, so every rank agrees to leave it
            self.count += int(ranks)
            self.mean += (total / ranks - self.mean) * ranks / self.count
        return self.mean

    def step_begins(self) -> None:
        self._at_step_begin = (self.mean, self.count)

    def step_skipped(self) -> None:
        self.mean, self.count = self._at_step_begin

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean, "count": self.count}

    def load(self, state: Mapping[str, Any]) -> None:
        mean = state.get("mean") if isinstance(state, Mapping) else None
        count = state.get("count") if isinstance(state, Mapping) else None
        if not (_finite_number(mean) and isinstance(count, int) and not isinstance(count, bool) and count >= 0):
            raise PluginError(
                f"the checkpoint's plugin state losses.{STATE_KEY} is {state!r}; expected "
                "{'mean': a finite number, 'count': an integer >= 0}: resume from a checkpoint this package wrote, "
                "or delete the entry to start the baseline again"
            )
        self.mean, self.count = float(mean), count
        self._at_step_begin = (self.mean, self.count)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mpo_loss(logps: PreferenceLogps, config: LossConfig, baseline: RewardBaseline) -> LossOutput:
    """Per pair ``w_p * preference + w_q * quality + w_g * generation``; their mean is the batch's MPO loss."""
    x = prepare(logps, config, "mpo", MPO_INPUTS, divides_by_counts=True)
    beta = config.beta
    chosen_rewards, rejected_rewards = beta * (x.chosen - x.ref_chosen), beta * (x.rejected - x.ref_rejected)
    preference = logistic_loss(chosen_rewards - rejected_rewards)
    delta = 0.0
    if config.mpo_running_baseline:
        rewards = torch.cat((chosen_rewards, rejected_rewards)).detach()
        # A batch that trains moves the baseline; one computed without gradients (evaluation) only reads it.
        delta = baseline.update(rewards) if logps.chosen.requires_grad else baseline.mean
    quality = logistic_loss(chosen_rewards - delta) + logistic_loss(-(rejected_rewards - delta))
    # One value for the batch, repeated per pair so that the pairs' mean is the batch's token mean.
    generation = (-x.chosen.sum() / x.chosen_token_count.sum()).expand_as(preference)
    losses = (
        config.mpo_preference_weight * preference
        + config.mpo_quality_weight * quality
        + config.mpo_generation_weight * generation
    )
    terms = {
        "mpo/preference_loss": preference,
        "mpo/quality_loss": quality,
        "mpo/generation_loss": generation,
        "mpo/reward_baseline": torch.tensor(delta),
    }
    return preference_output(losses, chosen_rewards, rejected_rewards, terms)
