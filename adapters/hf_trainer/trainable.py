"""Which parameters train at each step: the freeze policy applied to the model a framework built.

The framework decided what may train (its freeze flags, LoRA targets, PEFT's frozen base); the policy
(``vlm_dpo_trainable_parameters``) says what trains at each optimizer step. ``limits_every_parameter``: the
policy may only narrow the framework's trainable set (LLaMA-Factory, whose flags are written from the policy);
otherwise only PEFT adapters are limited (TRL adds a frozen "ref" adapter that must stay frozen) and every other
parameter follows the policy.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from vlm_dpo_plugins.freeze.apply import apply_trainable, is_adapter_parameter
from vlm_dpo_plugins.freeze.names import named_parameters
from vlm_dpo_plugins.guards.clipping import parameters_by_group
from vlm_dpo_plugins.types import ParameterGroups

logger = logging.getLogger("vlm_dpo_plugins.adapters")


LAST_STEP = 2**62
"""A step after every unfreeze stage: what the policy trains there is what it ever trains."""


class TrainableState:
    """``hold_later_stages``: DDP, FSDP2 and DeepSpeed fix the parameters they synchronise when they wrap the
    model, so a parameter made trainable later would never be averaged across ranks. There, every parameter of a
    later unfreeze stage is trainable from the start and held: its gradient is computed and averaged, then dropped
    before clipping and the optimizer step (``drop_held_gradients``) until its stage, when it joins the optimizer
    as it does on one process.
    """

    def __init__(
        self, plugins: Any, model: Any, *, limits_every_parameter: bool, hold_later_stages: bool = False
    ) -> None:
        self.plugins = plugins
        self.model = model
        self.limits_every_parameter = limits_every_parameter
        self.hold_later_stages = hold_later_stages
        self.held: set[str] = set()
        groups = plugins.hook.vlm_dpo_classify_parameters(
            model=model, model_type=getattr(model.config, "model_type", None)
        )
        # No plugin classifies (the freeze policy blocked): one group, so clipping and sharing still see every weight.
        self.groups: ParameterGroups = groups or {"other": [name for name, _ in named_parameters(model)]}
        self.framework_trainable = {
            name
            for name, parameter in named_parameters(model)
            if parameter.requires_grad and (limits_every_parameter or is_adapter_parameter(name))
        }
        self._wanted: set[str] | None = None
        self._by_group: dict[str, list[torch.nn.Parameter]] | None = None

    def apply(self, step: int) -> set[str]:
        """Make trainable what the policy wants at ``step``; the names that became trainable."""
        wanted = self.policy_wants(step)
        if wanted is None or wanted == self._wanted:
            return set()
        previous, self._wanted = self._wanted, wanted
        self._by_group = None
        if not self.hold_later_stages:
            return apply_trainable(self.model, wanted, self.groups)
        if previous is None:
            self.held = (self.policy_wants(LAST_STEP) or wanted) - wanted
            if self.held:
                logger.info(
                    "vlm-dpo: the %d parameter(s) of later unfreeze stages are trainable from the start, so the "
                    "distributed engine (DDP, FSDP2, DeepSpeed) reduces their gradients with the others; each "
                    "gradient is dropped before the optimizer step until its stage",
                    len(self.held),
                )
        newly = wanted - (previous or set())
        self.held -= wanted
        made_trainable = apply_trainable(self.model, wanted | self.held, self.groups)
        if previous is None:
            return made_trainable
        return {name for name, parameter in named_parameters(self.model) if name in newly and parameter.requires_grad}

    def policy_wants(self, step: int) -> set[str] | None:
        """The names the policy trains at ``step``, within what the framework allows."""
        wanted = self.plugins.hook.vlm_dpo_trainable_parameters(groups=self.groups, step=step)
        if wanted is None or not self.framework_trainable:
            return wanted
        if self.limits_every_parameter:
            return wanted & self.framework_trainable
        return {n for n in wanted if not is_adapter_parameter(n) or n in self.framework_trainable}

    def is_trained(self, name: str, parameter: torch.nn.Parameter) -> bool:
        """Whether the optimizer steps this parameter now (a held parameter computes a gradient but is not)."""
        return parameter.requires_grad and name not in self.held

    def drop_held_gradients(self) -> None:
        if self.held:
            for name, parameter in named_parameters(self.model):
                if name in self.held:
                    parameter.grad = None

    def by_group(self) -> dict[str, list[torch.nn.Parameter]]:
        """The trainable parameters per group, as the guards clip them."""
        if self._by_group is None:
            trained = ((n, p) for n, p in named_parameters(self.model) if n not in self.held)
            self._by_group = parameters_by_group(trained, self.groups)
        return self._by_group

    def warn_about_groups_kept_frozen(self, groups_ever_trained: set[str], hint: Any) -> None:
        """A group the policy trains, but of which the framework made nothing trainable, stays frozen: say so."""
        if not self.limits_every_parameter:
            return
        for group in sorted(groups_ever_trained):
            names = self.groups.get(group, [])
            if names and not any(name in self.framework_trainable for name in names):
                logger.warning(
                    "vlm-dpo: the freeze policy trains the %s group, but the framework made none of its parameters "
                    "trainable: it stays frozen. %s",
                    group,
                    hint(group),
                )


def lora_targets_from_policy(plugins: Any, model: Any, peft_config: Any) -> Any:
    """``peft_config`` with LoRA on the trainable groups only, when the user left the targets to PEFT.

    PEFT's defaults (``"all-linear"``, or unset: names such as ``q_proj``) match the vision tower's linears too:
    adapters there would either train the part the freeze policy keeps fixed or sit frozen. For a framework that
    takes a PEFT config from the user (TRL); the others pick targets from their freeze flags.
    """
    if peft_config is None or isinstance(model, str) or not hasattr(peft_config, "target_modules"):
        return peft_config
    if peft_config.target_modules not in (None, "all-linear"):
        return peft_config
    groups = plugins.hook.vlm_dpo_classify_parameters(model=model, model_type=getattr(model.config, "model_type", None))
    targets = plugins.hook.vlm_dpo_lora_target_modules(model=model, groups=groups)
    if not targets:
        return peft_config
    logger.info("vlm-dpo: LoRA on %d linear modules of the trainable groups", len(targets))
    peft_config = copy.copy(peft_config)
    peft_config.target_modules = set(targets)
    return peft_config
