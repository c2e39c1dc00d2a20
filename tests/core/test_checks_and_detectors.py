"""Pair checks on tokenized pairs and the ln 2 stall detector."""

from __future__ import annotations

import math

from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import Severity


def configured(config=None):
    manager = create_plugin_manager(load_entry_points=False)
    manager.hook.vlm_dpo_configure(config=manager.load_config(config or {}))
    return manager


def check(manager, chosen, chosen_mask, rejected, rejected_mask, row=3):
    results = manager.hook.vlm_dpo_check_pair(
        chosen_ids=chosen, chosen_mask=chosen_mask, rejected_ids=rejected, rejected_mask=rejected_mask,
        row=row, special={"pad": 0},
    )
    return [finding for batch in results for finding in batch]


def test_a_good_pair_has_no_findings():
    assert check(configured(), [5, 6, 7, 8], [0, 0, 1, 1], [5, 6, 9, 0], [0, 0, 1, 0]) == []


def test_token_identical_responses_are_an_error_naming_the_row():
    findings = check(configured(), [5, 6, 7, 8], [0, 0, 1, 1], [5, 6, 7, 8, 0], [0, 0, 1, 1, 0], row=11)
    assert [(f.code, f.severity, f.row, f.field) for f in findings] == [("identical-pair", Severity.ERROR, 11, "rejected")]
    assert "ln 2" in findings[0].message and findings[0].fix
    assert str(findings[0]).startswith("[error] identical-pair (row 11, field 'rejected'): ")


def test_a_fully_masked_response_is_an_empty_response():
    findings = check(configured(), [5, 6, 7], [0, 0, 1], [5, 6, 9], [0, 0, 0])
    assert [(f.code, f.field) for f in findings] == [("empty-response", "rejected")]


def test_min_response_tokens_and_switch_off():
    assert [f.code for f in check(configured({"collation": {"min_response_tokens": 2}}), [1, 2], [0, 1], [1, 3, 4], [0, 1, 1])] == ["empty-response"]
    assert check(configured({"collation": {"check_pairs": False}}), [1], [1], [1], [1]) == []


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
