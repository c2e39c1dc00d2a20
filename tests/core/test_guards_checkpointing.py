"""The gradient-checkpointing / DDP decision table, and the hooks that hand it to the adapters."""

from __future__ import annotations

import pytest

from vlm_dpo_plugins.guards.checkpointing import checkpointing_plan
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import RunContext

NON_REENTRANT = {"use_reentrant": False}
REENTRANT = {"use_reentrant": True}
STATIC_GRAPH = {"static_graph": True, "find_unused_parameters": False}


def context(**fields):
    return RunContext(framework="test", gradient_checkpointing=True, **fields)


@pytest.mark.parametrize(
    "run, frozen, prefer_non_reentrant, kwargs, ddp, input_requires_grad",
    [
        # the default everywhere: non-reentrant, and DDP may keep any find_unused_parameters
        (context(), True, True, NON_REENTRANT, {}, False),
        (context(world_size=2, uses_peft=True), True, True, NON_REENTRANT, {}, False),
        (context(world_size=8, uses_fsdp=True), False, True, NON_REENTRANT, {}, False),
        (context(world_size=2, uses_deepspeed=True, deepspeed_stage=2, uses_peft=True), True, True, NON_REENTRANT, {},
         False),
        # PEFT under ZeRO-3 keeps reentrant (no DDP reducer there), whatever the preference
        (context(world_size=2, uses_deepspeed=True, deepspeed_stage=3, uses_peft=True), True, True, REENTRANT, {},
         True),
        (context(world_size=2, uses_deepspeed=True, deepspeed_stage=3), False, True, NON_REENTRANT, {}, False),
        # reentrant kept on purpose: DDP needs a static graph; frozen inputs need enable_input_require_grads
        (context(world_size=2, uses_peft=True), True, False, REENTRANT, STATIC_GRAPH, True),
        (context(world_size=2), True, False, REENTRANT, STATIC_GRAPH, True),
        (context(world_size=2), False, False, REENTRANT, STATIC_GRAPH, False),
        (context(), True, False, REENTRANT, {}, True),
        (context(world_size=2, uses_deepspeed=True, deepspeed_stage=1), True, False, REENTRANT, {}, True),
        (RunContext(framework="test", world_size=2), True, False, REENTRANT, {}, True),  # checkpointing off
    ],
)
def test_decision_table(run, frozen, prefer_non_reentrant, kwargs, ddp, input_requires_grad):
    plan = checkpointing_plan(run, frozen_parameters=frozen, prefer_non_reentrant=prefer_non_reentrant)
    assert (plan.gradient_checkpointing_kwargs, plan.ddp_kwargs, plan.input_requires_grad) == (
        kwargs, ddp, input_requires_grad
    )
    assert plan.reason


def configured(config):
    manager = create_plugin_manager(load_entry_points=False)
    manager.hook.vlm_dpo_configure(config=manager.load_config(config))
    return manager


def test_hooks_give_the_plan_of_the_configured_run():
    ddp_lora = context(world_size=2, uses_peft=True)
    default = configured({})
    assert default.hook.vlm_dpo_gradient_checkpointing_kwargs(context=ddp_lora) == NON_REENTRANT
    assert default.hook.vlm_dpo_ddp_kwargs(context=ddp_lora) == {}
    kept_reentrant = configured({"guards": {"non_reentrant_checkpointing": False}})
    assert kept_reentrant.hook.vlm_dpo_gradient_checkpointing_kwargs(context=ddp_lora) == REENTRANT
    assert kept_reentrant.hook.vlm_dpo_ddp_kwargs(context=ddp_lora) == STATIC_GRAPH


def test_the_freeze_config_tells_the_guards_whether_towers_are_frozen():
    everything_trains = configured({"freeze": {"trainable": ["vision", "projector", "language"]},
                                    "guards": {"non_reentrant_checkpointing": False}})
    assert not everything_trains.get_plugin("guards").checkpointing_plan(context()).input_requires_grad
    frozen_tower = configured({"guards": {"non_reentrant_checkpointing": False}})
    assert frozen_tower.get_plugin("guards").checkpointing_plan(context()).input_requires_grad
