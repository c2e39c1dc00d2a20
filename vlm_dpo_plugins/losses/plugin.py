"""Built-in loss variants and the dispatch on ``loss.type``."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.losses.registry import BUILTIN_LOSS_INPUTS, BUILTIN_LOSSES
from vlm_dpo_plugins.markers import hookimpl
from vlm_dpo_plugins.types import LossInputs, LossOutput, PreferenceLogps


class LossVariants:
    @hookimpl
    def vlm_dpo_loss_functions(self) -> Mapping[str, Callable]:
        return BUILTIN_LOSSES

    @hookimpl(trylast=True)
    def vlm_dpo_loss_inputs(self, loss_type: str) -> LossInputs | None:
        return BUILTIN_LOSS_INPUTS.get(loss_type)

    @hookimpl(trylast=True)
    def vlm_dpo_compute_loss(self, logps: PreferenceLogps, config: VLMDPOConfig) -> LossOutput | None:
        function = BUILTIN_LOSSES.get(config.loss.type)
        if function is None:
            return None  # a third-party variant: its own plugin answers
        return function(logps, config.loss)
