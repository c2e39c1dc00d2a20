"""Fault injection inside ``VLMDPOTrainer.train()``: every fault of the matrix skipped, nothing lost.

Each run injects one fault (``tests/support/fault_plugin.py``, registered in the run's plugin manager) at a
seeded step of a full-tuning run on the tiny LLaVA, with a checkpoint (weights, AdamW state, scheduler) after
every step: the same assertions on the same files as the LLaMA-Factory and ms-swift suites.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

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
from fault_plugin import FAULTS, FaultInjector  # noqa: E402
from trl_runs import make_trainer, training_logs  # noqa: E402

from vlm_dpo_plugins.errors import TrainingHalted  # noqa: E402
from vlm_dpo_plugins.manager import create_plugin_manager  # noqa: E402


def faulty_trainer(tiny_model_dirs, preference_rows, output_dir, *, fault, steps, max_steps, guards=None):
    manager = create_plugin_manager(load_entry_points=False)
    manager.register(FaultInjector(fault, steps), name="test_fault_injection")
    return make_trainer(
        tiny_model_dirs["llava"],
        preference_rows,
        output_dir,
        max_steps=max_steps,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=1,
        plugin_manager=manager,
        vlm_dpo_config={"guards": {**GUARDS, **(guards or {})}},
    )


@pytest.mark.reliability("TRL")
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_is_skipped_on_every_rank_and_changes_nothing(
    tiny_model_dirs, preference_rows, tmp_path, capsys, caplog, fault
):
    at = fault_step(fault)
    trainer = faulty_trainer(tiny_model_dirs, preference_rows, tmp_path, fault=fault, steps=[at], max_steps=at + 2)
    trainer.train()
    assert f"[test_fault_injection] {fault} at step {at}:" in capsys.readouterr().out
    assert_fault_skipped_once("\n".join(record.getMessage() for record in caplog.records), fault, at)
    assert [entry["vlm_dpo/skipped_steps"] for entry in training_logs(trainer)] == skipped_steps_logged(at)
    assert_step_changed_nothing(tmp_path, at)


@pytest.mark.reliability("TRL", row=CONSECUTIVE)
def test_consecutive_faults_save_a_checkpoint_and_stop_naming_the_cause(tiny_model_dirs, preference_rows, tmp_path):
    trainer = faulty_trainer(
        tiny_model_dirs,
        preference_rows,
        tmp_path,
        fault="grad-nan",
        steps=[1, 2],
        max_steps=5,
        guards={"max_consecutive_skips": 2},
    )
    with pytest.raises(TrainingHalted) as halt:
        trainer.train()
    message = str(halt.value)
    assert f"{HALT_MESSAGE} (last at step 2: non-finite gradient norm (nan)" in message and HALT_SETTING in message
    assert_halt_checkpoint(message, tmp_path, last_fault_at=2, skipped=2)
