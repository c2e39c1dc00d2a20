"""Built-in loss variants: the registry of ``loss.type`` names, what each needs, mDPO's extra rows and MPO's
reward baseline (per run: saved in checkpoints, and taken back when the guards skip a step)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from vlm_dpo_plugins.losses.extra_rows import ExtraRows
from vlm_dpo_plugins.losses.mdpo import CORRUPTED_IMAGE_ROWS
from vlm_dpo_plugins.losses.mpo import STATE_KEY, RewardBaseline
from vlm_dpo_plugins.losses.registry import BUILTIN_LOSS_INPUTS, builtin_losses
from vlm_dpo_plugins.losses.settings import LossConfig
from vlm_dpo_plugins.markers import hookimpl
from vlm_dpo_plugins.types import LossInputs, PluginState, StepSignals

EXTRA_ROWS = {
    key: CORRUPTED_IMAGE_ROWS for key in (CORRUPTED_IMAGE_ROWS.policy_key, CORRUPTED_IMAGE_ROWS.reference_key)
}


class LossVariants:
    def __init__(self) -> None:
        self.reward_baseline = RewardBaseline()
        self.losses = builtin_losses(self.reward_baseline)

    @hookimpl
    def vlm_dpo_config_sections(self) -> Mapping[str, type]:
        return {"loss": LossConfig}

    @hookimpl
    def vlm_dpo_loss_functions(self) -> Mapping[str, Callable]:
        return self.losses

    @hookimpl(trylast=True)
    def vlm_dpo_loss_inputs(self, loss_type: str) -> LossInputs | None:
        return BUILTIN_LOSS_INPUTS.get(loss_type)

    @hookimpl(trylast=True)
    def vlm_dpo_extra_rows(self, extras_key: str) -> ExtraRows | None:
        return EXTRA_ROWS.get(extras_key)

    @hookimpl
    def vlm_dpo_step_begin(self, step: int, model: torch.nn.Module) -> None:
        self.reward_baseline.step_begins()

    @hookimpl
    def vlm_dpo_after_optimizer_step(self, signals: StepSignals, skipped: bool, reasons: Sequence[str]) -> None:
        # The skipped step's batches did not train, so they do not move the baseline either (on every rank alike).
        if skipped:
            self.reward_baseline.step_skipped()

    @hookimpl
    def vlm_dpo_state_dict(self) -> tuple[str, PluginState]:
        return "losses", {STATE_KEY: self.reward_baseline.state()}

    @hookimpl
    def vlm_dpo_load_state_dict(self, states: Mapping[str, PluginState]) -> None:
        state = states.get("losses")  # None in a checkpoint written before MPO's baseline was saved
        if state is not None:
            self.reward_baseline.load(state.get(STATE_KEY) if isinstance(state, Mapping) else state)
