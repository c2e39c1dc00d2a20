"""Settings of the freeze policy (config section ``freeze``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlm_dpo_plugins.validation import PARAMETER_GROUPS, require, require_choice


@dataclass
class UnfreezeStage:
    """At optimizer step ``at_step``, make ``groups`` trainable, plus the last ``vision_blocks`` vision blocks."""

    at_step: int
    groups: tuple[str, ...] = ()
    vision_blocks: int = 0

    def __post_init__(self) -> None:
        require(self.at_step >= 1, "at_step", self.at_step, "an optimizer step >= 1 (step 0 is the initial plan)")
        require(self.vision_blocks >= 0, "vision_blocks", self.vision_blocks, "a count >= 0")
        for group in self.groups:
            require_choice("groups", group, PARAMETER_GROUPS)


@dataclass
class FreezeConfig:
    trainable: tuple[str, ...] = ("language",)
    learning_rates: dict[str, float] = field(default_factory=dict)
    unfreeze: tuple[UnfreezeStage, ...] = ()
    lora_skip_frozen: bool = True

    def __post_init__(self) -> None:
        for group in self.trainable:
            require_choice("trainable", group, PARAMETER_GROUPS)
        for group, rate in self.learning_rates.items():
            require_choice("learning_rates", group, PARAMETER_GROUPS)
            require(rate > 0, f"learning_rates.{group}", rate, "a learning rate > 0")
        steps = [stage.at_step for stage in self.unfreeze]
        require(steps == sorted(set(steps)), "unfreeze", steps, "stages in increasing, distinct at_step order")
        for index, stage in enumerate(self.unfreeze):
            require(
                bool(stage.groups) or stage.vision_blocks > 0,
                f"unfreeze[{index}]",
                {"at_step": stage.at_step},
                "'groups' or 'vision_blocks' > 0 (a stage that unfreezes nothing is a typo)",
            )
        never_trained = sorted(set(self.learning_rates) - self.groups_ever_trained(), key=PARAMETER_GROUPS.index)
        require(
            not never_trained,
            "learning_rates",
            {group: self.learning_rates[group] for group in never_trained},
            "rates only for groups that train: list them in 'trainable' or an 'unfreeze' stage",
        )

    def groups_ever_trained(self) -> set[str]:
        """The groups that train at some step: from the start, by a stage, or in part (the last vision blocks)."""
        groups = set(self.trainable)
        for stage in self.unfreeze:
            groups.update(stage.groups)
            if stage.vision_blocks:
                groups.add("vision")
        return groups
