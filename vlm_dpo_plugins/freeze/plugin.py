"""Built-in freeze policy: train the language model, keep the vision tower and projector frozen.

Trainable vision/projector parameters are the usual cause of LLaVA DPO runs whose
loss rises while reward accuracy sits at 0.5; freezing them is the default fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.freeze.classify import GROUPS, classify_names, last_blocks
from vlm_dpo_plugins.freeze.lora import lora_target_modules
from vlm_dpo_plugins.freeze.names import named_parameters
from vlm_dpo_plugins.freeze.report import LOGGER, format_trainable_report, trainable_report
from vlm_dpo_plugins.freeze.settings import FreezeConfig
from vlm_dpo_plugins.markers import hookimpl
from vlm_dpo_plugins.types import ParameterGroups, RunContext

_SHOWN_UNMATCHED = 5


class FreezePolicy:
    @hookimpl
    def vlm_dpo_config_sections(self) -> Mapping[str, type]:
        return {"freeze": FreezeConfig}

    def __init__(self) -> None:
        self.config = FreezeConfig()
        self.groups: ParameterGroups | None = None
        self.model_type: str | None = None
        self.reported = False
        self.warned_unmatched: set[tuple[str | None, int]] = set()

    @hookimpl
    def vlm_dpo_configure(self, config: VLMDPOConfig) -> None:
        self.config = config.freeze

    @hookimpl(trylast=True)
    def vlm_dpo_classify_parameters(self, model: torch.nn.Module, model_type: str | None) -> ParameterGroups:
        model_type = model_type or getattr(getattr(model, "config", None), "model_type", None)
        result = classify_names((name for name, _ in named_parameters(model)), model_type)
        if result.unmatched and (model_type, len(result.unmatched)) not in self.warned_unmatched:
            self.warned_unmatched.add((model_type, len(result.unmatched)))  # guards and adapters classify again
            shown = ", ".join(result.unmatched[:_SHOWN_UNMATCHED])
            LOGGER.warning(
                "%d parameter(s) of model type %r match no module of a known layout and are grouped as 'other' "
                "(trainable only if freeze.trainable lists 'other'): %s%s. Add the model type to "
                "vlm_dpo_plugins.freeze.registry.LAYOUTS.",
                len(result.unmatched),
                model_type,
                shown,
                ", ..." if len(result.unmatched) > _SHOWN_UNMATCHED else "",
            )
        self.groups, self.model_type = result.groups, model_type
        return result.groups

    @hookimpl(trylast=True)
    def vlm_dpo_trainable_parameters(self, groups: ParameterGroups, step: int) -> set[str]:
        trainable_groups = set(self.config.trainable)
        extra_vision_blocks = 0
        for stage in self.config.unfreeze:
            if stage.at_step <= step:
                trainable_groups.update(stage.groups)
                extra_vision_blocks = max(extra_vision_blocks, stage.vision_blocks)
        names = {name for group in trainable_groups for name in groups.get(group, ())}
        return names | last_blocks(groups.get("vision", ()), extra_vision_blocks, self.model_type)

    @hookimpl(trylast=True)
    def vlm_dpo_optimizer_groups(
        self, groups: ParameterGroups, trainable: set[str], base_learning_rate: float
    ) -> list[dict[str, Any]]:
        # Groups that only a later stage unfreezes are listed now with no names, so that the
        # optimizer and its LR scheduler know them from step 0.
        later = self.config.groups_ever_trained()
        optimizer_groups = []
        for group in [*GROUPS, *(g for g in groups if g not in GROUPS)]:
            selected = [name for name in groups.get(group, ()) if name in trainable]
            if selected or group in later:
                rate = self.config.learning_rates.get(group, base_learning_rate)
                optimizer_groups.append({"group": group, "names": selected, "lr": rate})
        return optimizer_groups

    @hookimpl(trylast=True)
    def vlm_dpo_lora_target_modules(self, model: torch.nn.Module, groups: ParameterGroups) -> list[str]:
        targeted_groups = self.config.trainable if self.config.lora_skip_frozen else tuple(groups)
        return lora_target_modules(model, (name for group in targeted_groups for name in groups.get(group, ())))

    @hookimpl
    def vlm_dpo_train_begin(self, model: torch.nn.Module, context: RunContext) -> None:
        # Under DDP, FSDP2 and DeepSpeed the adapters hold later stages' parameters trainable from the start
        # (adapters/hf_trainer/trainable.py, staged_groups.py); FSDP1 flattens each unit's parameters at wrap time.
        if self.config.unfreeze and context.uses_fsdp and context.fsdp_version != 2:
            raise ConfigError(
                f"'freeze.unfreeze' stages cannot run under FSDP version {context.fsdp_version}: it flattens each "
                "unit's parameters into one buffer when it wraps the model, with the optimizer over those buffers, "
                "so a parameter unfrozen later would never be updated, and one held trainable from the start would "
                "be stepped with the rest of its buffer before its stage. Use FSDP2 (fsdp_config version: 2), "
                "DeepSpeed, DDP or one process, or train those groups from step 0 with a small rate in "
                "'freeze.learning_rates'."
            )
        if self.reported:
            return
        groups = self.groups
        if groups is None:
            groups = self.vlm_dpo_classify_parameters(model=model, model_type=context.model_type)
        LOGGER.info(format_trainable_report(trainable_report(groups, model)))
        self.reported = True

    @hookimpl
    def vlm_dpo_metrics(self, step: int) -> Mapping[str, float]:
        if not self.config.unfreeze:
            return {}
        # Logged as a count so a plot can mark where it rises: an unfreeze event. ``step`` steps were taken, the
        # last of them step ``step - 1``: a stage counts from the line of the first step it trained in.
        return {"vlm_dpo/unfreeze_stage": float(sum(stage.at_step < step for stage in self.config.unfreeze))}
