"""``swift rlhf`` with the adapter reproduces its recorded per-step traces bit for bit.

Full tuning of the tiny Qwen2-VL with the plugins' sigmoid loss and a NaN gradient at step 1 (the guarded step
skips it), and of the tiny LLaVA with swift's own ``--loss_type`` code (the adapter computes its log-probs in
fp32). See ``tests/support/traces.py``.
"""

from __future__ import annotations

import pytest

swift = pytest.importorskip("swift", reason="needs the ms-swift test environment (ms-swift==4.6.0)")
if getattr(swift, "__file__", None) is None:
    pytest.skip("`swift` is not ms-swift here", allow_module_level=True)

import yaml  # noqa: E402
from fault_plugin import install as install_fault_plugin  # noqa: E402
from traces import check_trace, follows_trace, saved_weights, step_trace, weights_digest  # noqa: E402

RUNS = {
    # Recorded with packed rows under a dense mask, which stays available.
    "qwen2_vl-full-grad-nan": dict(
        model="qwen2_vl", fault_at=1, config={"loss": {"type": "sigmoid"}, "sharing": {"attention": "dense"}}
    ),
    "llava-full-swift-loss": dict(model="llava", fault_at=None, config=None),
}


@pytest.mark.parametrize("name", RUNS)
def test_training_reproduces_the_recorded_trace(swift_dpo, swift_tiny_models, plugin_file, tmp_path, name):
    run = traced_run(swift_dpo, swift_tiny_models, plugin_file, tmp_path, RUNS[name])
    check_trace(f"swift-{name}", step_trace(run.logged_steps()), weights_digest(saved_weights(run.last_checkpoint())))


def test_the_mask_free_attention_follows_the_recorded_trace(swift_dpo, swift_tiny_models, plugin_file, tmp_path):
    spec = {**RUNS["qwen2_vl-full-grad-nan"], "config": {"loss": {"type": "sigmoid"}}}
    run = traced_run(swift_dpo, swift_tiny_models, plugin_file, tmp_path, spec)
    assert "two causal attention calls per row, no mask" in run.stdout + run.stderr, run.tail()
    follows_trace("swift-qwen2_vl-full-grad-nan", step_trace(run.logged_steps()), tolerance=1e-5)


def traced_run(swift_dpo, swift_tiny_models, plugin_file, tmp_path, spec):
    env = {}
    if spec["config"] is not None:
        path = tmp_path / "vlm_dpo.yaml"
        path.write_text(yaml.safe_dump(spec["config"]))
        env["VLM_DPO_CONFIG"] = str(path)
    if spec["fault_at"] is not None:
        env.update(install_fault_plugin(tmp_path / "plugins", fault="grad-nan", steps=[spec["fault_at"]]))
    run = swift_dpo(
        swift_tiny_models[spec["model"]],
        num_rows=8,
        max_steps=4,
        extra_args=["--external_plugins", plugin_file],
        env_extra=env,
    )
    assert run.returncode == 0, run.tail()
    return run


def test_a_variant_an_installed_plugin_only_registers_trains(swift_dpo, swift_tiny_models, plugin_file, tmp_path):
    import math

    from variant_plugin import VARIANT
    from variant_plugin import install as install_variant_plugin

    path = tmp_path / "vlm_dpo.yaml"
    path.write_text(yaml.safe_dump({"loss": {"type": VARIANT}}))
    env = {"VLM_DPO_CONFIG": str(path), **install_variant_plugin(tmp_path / "plugins")}
    run = swift_dpo(
        swift_tiny_models["qwen2_vl"], max_steps=2, extra_args=["--external_plugins", plugin_file], env_extra=env
    )
    assert run.returncode == 0, run.tail()
    assert f"loss '{VARIANT}'" in run.stdout + run.stderr, run.tail()
    assert run.logged_steps()[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-4)
