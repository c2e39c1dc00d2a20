"""``llamafactory-cli train`` with the adapter reproduces its recorded per-step traces bit for bit.

LoRA on the tiny LLaVA with a NaN gradient at step 1 (the guarded step skips it; the reference is the policy with
its adapter off), and full tuning of the tiny Qwen2-VL with mDPO (a third block of rows, M-RoPE positions laid
out ``[3, rows, length]``). See ``tests/support/traces.py``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")

from fault_plugin import install as install_fault_plugin  # noqa: E402
from traces import check_trace, follows_trace, saved_weights, step_trace, weights_digest  # noqa: E402

DENSE_MASK = {"sharing": {"attention": "dense"}}
"""The traces were recorded with packed rows under a dense mask, which stays available."""
RUNS = {
    "llava-lora-grad-nan": dict(model="llava", tuning="lora", fault_at=1, vlm_dpo=DENSE_MASK),
    "qwen2_vl-full-mdpo": dict(model="qwen2_vl", tuning="full", fault_at=None, vlm_dpo={"loss": {"type": "mdpo"}}),
}


@pytest.mark.parametrize("name", RUNS)
def test_training_reproduces_the_recorded_trace(llamafactory_dpo, tmp_path, name):
    run = traced_run(llamafactory_dpo, tmp_path, RUNS[name])
    check_trace(f"llamafactory-{name}", step_trace(run.log_history), weights_digest(saved_weights(run.output_dir)))


def test_the_mask_free_attention_follows_the_recorded_trace(llamafactory_dpo, tmp_path):
    run = traced_run(llamafactory_dpo, tmp_path, {**RUNS["llava-lora-grad-nan"], "vlm_dpo": {}})
    assert "two causal attention calls per row, no mask" in run.output, run.log()
    follows_trace("llamafactory-llava-lora-grad-nan", step_trace(run.log_history), tolerance=1e-5)


def traced_run(llamafactory_dpo, tmp_path, spec):
    env = None
    if spec["fault_at"] is not None:
        env = install_fault_plugin(tmp_path / "plugins", fault="grad-nan", steps=[spec["fault_at"]])
    run = llamafactory_dpo(spec["model"], spec["tuning"], env=env, max_steps=4, vlm_dpo=spec["vlm_dpo"] or None)
    assert run.returncode == 0, run.log()
    return run


def test_a_variant_an_installed_plugin_only_registers_trains(llamafactory_dpo, tmp_path):
    import math

    from variant_plugin import TERM, VARIANT
    from variant_plugin import install as install_variant_plugin

    env = install_variant_plugin(tmp_path / "plugins")
    run = llamafactory_dpo("llava", "lora", env=env, max_steps=2, vlm_dpo={"loss": {"type": VARIANT}})
    assert run.returncode == 0, run.log()
    assert f"loss '{VARIANT}'" in run.output, run.log()
    assert run.losses[0] == pytest.approx(2 * math.log(2), abs=1e-4)
    # Its term reaches LLaMA-Factory's own log line, though no built-in variant logs that name.
    assert run.trainer_log[0][TERM] == pytest.approx(math.log(2), abs=1e-4)
