"""Built-in loss variants: the registry of ``loss.type`` names, what each needs, and mDPO's extra rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from vlm_dpo_plugins.losses.extra_rows import ExtraRows
from vlm_dpo_plugins.losses.mdpo import CORRUPTED_IMAGE_ROWS
from vlm_dpo_plugins.losses.settings import LossConfig
from vlm_dpo_plugins.losses.registry import BUILTIN_LOSS_INPUTS, BUILTIN_LOSSES
from vlm_dpo_plugins.markers import hookimpl
from vlm_dpo_plugins.types import LossInputs

EXTRA_ROWS = {CORRUPTED_IMAGE_ROWS.policy_key: CORRUPTED_IMAGE_ROWS, CORRUPTED_IMAGE_ROWS.reference_key: CORRUPTED_IMAGE_ROWS}


class LossVariants:
    @hookimpl
    def vlm_dpo_config_sections(self) -> Mapping[str, type]:
        return {"loss": LossConfig}

    @hookimpl
    def vlm_dpo_loss_functions(self) -> Mapping[str, Callable]:
        return BUILTIN_LOSSES

    @hookimpl(trylast=True)
    def vlm_dpo_loss_inputs(self, loss_type: str) -> LossInputs | None:
        return BUILTIN_LOSS_INPUTS.get(loss_type)

    @hookimpl(trylast=True)
    def vlm_dpo_extra_rows(self, extras_key: str) -> ExtraRows | None:
        return EXTRA_ROWS.get(extras_key)
