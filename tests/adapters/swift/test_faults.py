"""Fault injection inside the real ``swift rlhf --rlhf_type dpo``: every fault of the matrix skipped, nothing lost.

Each run injects one fault (``tests/support/fault_plugin.py``, installed as a third-party plugin) at a seeded
step of a LoRA run on the tiny Qwen2-VL, with a checkpoint (weights, AdamW state, scheduler) after every step.
The plugin config chooses the loss (``loss.type``), so the plugins compute it and the loss faults have a loss to
poison; swift's own loss path is covered by the gradient, logits and pixel faults too.
"""

from __future__ import annotations

import pytest

swift = pytest.importorskip("swift", reason="needs the ms-swift test environment (ms-swift==4.6.0)")
if getattr(swift, "__file__", None) is None:
    pytest.skip("`swift` is not ms-swift here", allow_module_level=True)

import yaml  # noqa: E402
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

PLUGIN_CONFIG = {"loss": {"type": "sigmoid"}, "guards": GUARDS}


def faulty_run(tmp_path, swift_dpo, model, plugin_file, *, fault, steps, max_steps, guards=None):
    config = {**PLUGIN_CONFIG, "guards": {**GUARDS, **(guards or {})}}
    (tmp_path / "vlm_dpo.yaml").write_text(yaml.safe_dump(config))
    env = {
        "VLM_DPO_CONFIG": str(tmp_path / "vlm_dpo.yaml"),
        **install_fault_plugin(tmp_path / "plugins", fault=fault, steps=steps),
    }
    extra = ["--tuner_type", "lora", "--save_steps", "1", "--save_only_model", "false"]
    return swift_dpo(model, max_steps=max_steps, extra_args=[*extra, "--external_plugins", plugin_file], env_extra=env)


@pytest.mark.reliability("ms-swift")
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_is_skipped_on_every_rank_and_changes_nothing(tmp_path, swift_dpo, qwen2_vl, plugin_file, fault):
    at = fault_step(fault)
    run = faulty_run(tmp_path, swift_dpo, qwen2_vl, plugin_file, fault=fault, steps=[at], max_steps=at + 2)
    output = run.stdout + run.stderr
    assert run.returncode == 0, run.tail()
    assert f"[test_fault_injection] {fault} at step {at}:" in output, run.tail()
    assert_fault_skipped_once(output, fault, at)
    assert [entry["vlm_dpo/skipped_steps"] for entry in run.logged_steps()] == skipped_steps_logged(at)
    assert_step_changed_nothing(run.output_dir, at)


@pytest.mark.reliability("ms-swift", row=CONSECUTIVE)
def test_consecutive_faults_save_a_checkpoint_and_stop_naming_the_cause(tmp_path, swift_dpo, qwen2_vl, plugin_file):
    run = faulty_run(
        tmp_path,
        swift_dpo,
        qwen2_vl,
        plugin_file,
        fault="grad-nan",
        steps=[1, 2],
        max_steps=5,
        guards={"max_consecutive_skips": 2},
    )
    assert run.returncode != 0, run.tail()
    assert f"TrainingHalted: {HALT_MESSAGE} (last at step 2: non-finite gradient norm (nan)" in run.stderr, run.tail()
    assert HALT_SETTING in run.stderr, run.tail()
    assert_halt_checkpoint(run.stderr, run.output_dir, last_fault_at=2, skipped=2)
