"""Smoke test of the environment itself: stock LLaMA-Factory (adapter off) trains the tiny LLaVA with DPO.

If this fails, the adapter tests beside it cannot mean anything: the framework, its dependencies or
the tiny model do not work together here. Full fine-tuning, fp32 on CPU, two steps; LLaMA-Factory's
default flags freeze the vision tower and projector.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")

STOCK_ENV = {"VLM_DPO_LLAMAFACTORY": "0"}


def test_stock_llava_dpo_two_steps_via_llamafactory_cli(llamafactory_dpo) -> None:
    run = llamafactory_dpo("llava", "full", env=STOCK_ENV, max_steps=2, pref_loss="sigmoid")
    assert run.returncode == 0, run.log()
    assert len(run.losses) == 2 and all(math.isfinite(loss) for loss in run.losses), run.log_history
    assert run.losses[0] == pytest.approx(math.log(2), abs=1e-3)  # the policy equals the reference at step 0
    parts = run.changed_parts()  # also checks that the saved model has exactly the initial tensor names
    assert parts["language"]["changed"], "no language-model weight changed after 2 DPO steps"
    assert parts["vision"]["changed"] == [] and parts["projector"]["changed"] == [], parts
    assert parts["vision"]["unchanged"] and parts["projector"]["unchanged"], parts
