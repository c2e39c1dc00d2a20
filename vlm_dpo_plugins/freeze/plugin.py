"""Built-in freeze policy: train the language model, keep the vision tower and projector frozen.

Trainable vision/projector parameters are the usual cause of LLaVA DPO runs whose
loss rises while reward accuracy sits at 0.5; freezing them is the default fix.
"""

from __future__ import annotations

from typing import Any

import torch

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.freeze.classify import classify, last_blocks
from vlm_dpo_plugins.freeze.settings import FreezeConfig
from vlm_dpo_plugins.markers import hookimpl
from vlm_dpo_plugins.types import ParameterGroups


class FreezePolicy:
    def __init__(self) -> None:
        self.config = FreezeConfig()

    @hookimpl
    def vlm_dpo_configure(self, config: VLMDPOConfig) -> None:
        self.config = config.freeze

    @hookimpl(trylast=True)
    def vlm_dpo_classify_parameters(self, model: torch.nn.Module, model_type: str | None) -> ParameterGroups:
        return classify(name for name, _ in model.named_parameters())

    @hookimpl(trylast=True)
    def vlm_dpo_trainable_parameters(self, groups: ParameterGroups, step: int) -> set[str]:
        trainable_groups = set(self.config.trainable)
        extra_vision_blocks = 0
        for stage in self.config.unfreeze:
            if stage.at_step <= step:
                trainable_groups.update(stage.groups)
                extra_vision_blocks = max(extra_vision_blocks, stage.vision_blocks)
        names = {name for group in trainable_groups for name in groups.get(group, ())}
        return names | last_blocks(groups.get("vision", ()), extra_vision_blocks)

    @hookimpl(trylast=True)
    def vlm_dpo_optimizer_groups(
        self, groups: ParameterGroups, trainable: set[str], base_learning_rate: float
    ) -> list[dict[str, Any]]:
        optimizer_groups = []
        for group, names in groups.items():
            selected = [name for name in names if name in trainable]
            if selected:
                rate = self.config.learning_rates.get(group, base_learning_rate)
                optimizer_groups.append({"group": group, "names": selected, "lr": rate})
        return optimizer_groups

    @hookimpl(trylast=True)
    def vlm_dpo_lora_target_modules(self, model: torch.nn.Module, groups: ParameterGroups) -> list[str]:
        targeted_groups = self.config.trainable if self.config.lora_skip_frozen else tuple(groups)
        allowed = {name for group in targeted_groups for name in groups.get(group, ())}
        return sorted(
            module_name
            for module_name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and f"{module_name}.weight" in allowed
            and not module_name.endswith("lm_head")
        )
