"""The ln 2 stall detector (the pair checks are tested in test_collation_*.py)."""

from __future__ import annotations

import math

from vlm_dpo_plugins.manager import create_plugin_manager


def configured(config=None):
    manager = create_plugin_manager(load_entry_points=False)
    manager.hook.vlm_dpo_configure(config=manager.load_config(config or {}))
    return manager


def log(manager, step, loss, margin):
    return [f for batch in manager.hook.vlm_dpo_on_log(step=step, metrics={"loss": loss, "rewards/margins": margin}) for f in batch]


def test_stall_at_ln2_warns_once_after_the_configured_steps():
    manager = configured({"diagnostics": {"stall_steps": 3}})
    assert log(manager, 1, math.log(2), 0.0) == [] and log(manager, 2, math.log(2) + 1e-4, 0.0) == []
    findings = log(manager, 3, math.log(2), 1e-5)
    assert [f.code for f in findings] == ["loss-stuck-at-ln2"] and "3 logged steps" in findings[0].message
    assert log(manager, 4, math.log(2), 0.0) == []  # once per cause


def test_a_moving_loss_resets_the_stall_count():
    manager = configured({"diagnostics": {"stall_steps": 2}})
    log(manager, 1, math.log(2), 0.0)
    assert log(manager, 2, 0.60, 0.2) == []
    assert log(manager, 3, math.log(2), 0.0) == []
    assert [f.code for f in log(manager, 4, math.log(2), 0.0)] == ["loss-stuck-at-ln2"]
