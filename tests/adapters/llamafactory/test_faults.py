"""Fault injection inside the real ``llamafactory-cli train``: every fault of the matrix skipped, nothing lost.

Each run injects one fault (``tests/support/fault_plugin.py``, installed as a third-party plugin) at a seeded
step of a LoRA run on the tiny LLaVA, with a checkpoint (weights, AdamW state, scheduler) after every step.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")

from fault_matrix import (  # noqa: E402
    CONSECUTIVE,
    GUARDS,
    HALT_MESSAGE,
    HALT_SETTING,
    assert_fault_skipped_once,
    assert_halt_checkpoint,
    assert_step_changed_nothing,
    fault_step,
    skipped_steps_logged,
)
from fault_plugin import FAULTS  # noqa: E402
from fault_plugin import install as install_fault_plugin  # noqa: E402
from llamafactory_runs import TINY_MODELS, dpo_config, run_llamafactory  # noqa: E402


def faulty_run(tmp_path, llava, tiny_dataset_dir, *, fault, steps, max_steps, guards=None):
    config = dpo_config(
        TINY_MODELS["llava"],
        llava,
        tiny_dataset_dir,
        tmp_path / "out",
        "lora",
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=1,
        vlm_dpo={"guards": {**GUARDS, **(guards or {})}},
    )
    return run_llamafactory(tmp_path, config, env=install_fault_plugin(tmp_path / "plugins", fault=fault, steps=steps))


@pytest.mark.reliability("LLaMA-Factory")
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_is_skipped_on_every_rank_and_changes_nothing(tmp_path, llava, tiny_dataset_dir, fault):
    at = fault_step(fault)
    run = faulty_run(tmp_path, llava, tiny_dataset_dir, fault=fault, steps=[at], max_steps=at + 2)
    assert run.returncode == 0, run.log()
    assert f"[test_fault_injection] {fault} at step {at}:" in run.output, run.log()
    assert_fault_skipped_once(run.output, fault, at)
    assert [entry["vlm_dpo/skipped_steps"] for entry in run.step_logs] == skipped_steps_logged(at)
    assert_step_changed_nothing(run.output_dir, at)


@pytest.mark.reliability("LLaMA-Factory", row=CONSECUTIVE)
def test_consecutive_faults_save_a_checkpoint_and_stop_naming_the_cause(tmp_path, llava, tiny_dataset_dir):
    run = faulty_run(
        tmp_path,
        llava,
        tiny_dataset_dir,
        fault="grad-nan",
        steps=[1, 2],
        max_steps=5,
        guards={"max_consecutive_skips": 2},
    )
    assert run.returncode != 0, run.log()
    assert f"TrainingHalted: {HALT_MESSAGE} (last at step 2: non-finite gradient norm (nan)" in run.stderr, run.log()
    assert HALT_SETTING in run.stderr, run.log()
    assert_halt_checkpoint(run.stderr, run.output_dir, last_fault_at=2, skipped=2)
