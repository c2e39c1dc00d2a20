"""Stock LLaMA-Factory 0.9.5 (adapters off) on the tiny VLMs: what the adapter tests build on, measured.

Every run sets ``VLM_DPO_LLAMAFACTORY=0``, so these test LLaMA-Factory itself whatever is installed.
At step 0 the policy equals the reference (LoRA: adapters disabled, ``lora_B`` zero), so every
log-ratio is 0 and sigmoid DPO's loss is -log σ(0) = ln 2.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")

STOCK_ENV = {"VLM_DPO_LLAMAFACTORY": "0"}
LN2 = math.log(2)
BETA = 0.1


def test_stock_qwen2_vl_lora_trains_only_language_adapters(llamafactory_dpo) -> None:
    run = llamafactory_dpo("qwen2_vl", "lora", env=STOCK_ENV, max_steps=2, pref_loss="sigmoid", pref_beta=BETA)
    assert run.returncode == 0, run.log()
    assert len(run.losses) == 2 and all(math.isfinite(loss) for loss in run.losses), run.log_history
    assert run.losses[0] == pytest.approx(LN2, abs=1e-6), run.losses
    assert [line["loss"] for line in run.trainer_log if "loss" in line] == pytest.approx(run.losses, abs=1e-4)
    parts = run.changed_parts()
    # LLaMA-Factory's default freeze flags keep LoRA off the vision tower and the merger altogether.
    assert parts["vision"] == parts["projector"] == {"changed": [], "unchanged": []}, parts
    assert parts["language"]["changed"] and parts["language"]["unchanged"] == [], parts["language"]["unchanged"]


def test_stock_torchrun_two_processes_share_the_training(llamafactory_dpo) -> None:
    # One thread per worker: two workers on two cores.
    env = {**STOCK_ENV, "OMP_NUM_THREADS": "1"}
    run = llamafactory_dpo("qwen2_vl", "lora", env=env, nproc=2, max_steps=2, pref_loss="sigmoid")
    assert run.returncode == 0, run.log()
    assert "Initializing 2 distributed tasks" in run.output, run.log()
    for rank in (0, 1):
        assert f"Process rank: {rank}, world size: 2, device: cpu" in run.output, run.log()
    # 2 rows per worker: a global batch of 4, so the 6 rows are half an epoch after the first step.
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in run.output, run.log()
    assert [entry["epoch"] for entry in run.step_logs] == [0.5, 1.0], run.step_logs
    assert run.losses[0] == pytest.approx(LN2, abs=1e-6) and all(math.isfinite(loss) for loss in run.losses)
    assert run.changed_parts()["language"]["changed"], "the language adapters did not train"


@pytest.mark.parametrize(
    ("pref_loss", "closed_form"), [("hinge", 1.0), ("ipo", 1 / (2 * BETA) ** 2)], ids=["hinge", "ipo"]
)
def test_stock_pref_loss_bug_is_present(llamafactory_dpo, pref_loss: str, closed_form: float) -> None:
    # LLaMA-Factory 0.9.5 calls TRL 0.24's dpo_loss without loss_type: hinge (max(0, 1 - h) = 1 at h = 0) and
    # IPO ((h - 1/(2β))² = 25) both train sigmoid. If this fails, LLaMA-Factory fixed it: revisit the adapter.
    run = llamafactory_dpo("llava", "lora", env=STOCK_ENV, max_steps=1, pref_loss=pref_loss, pref_beta=BETA)
    assert run.returncode == 0, run.log()
    assert run.losses[0] == pytest.approx(LN2, abs=1e-6), (pref_loss, run.losses)
    assert run.losses[0] != pytest.approx(closed_form, abs=1e-3)
