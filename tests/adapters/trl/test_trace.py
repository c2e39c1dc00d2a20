"""``VLMDPOTrainer.train()`` reproduces its recorded per-step traces bit for bit (``tests/support/traces.py``).

Three runs cover the paths the shared DPO step carries: full tuning of the tiny LLaVA with a NaN gradient at
step 1 (the guarded step skips it), LoRA on the tiny Qwen2-VL (the reference is the policy with its adapter
off; M-RoPE positions), and mDPO on the tiny LLaVA (a third block of rows through ``extras``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from fault_plugin import FaultInjector  # noqa: E402
from traces import check_trace, follows_trace, step_trace, weights_digest  # noqa: E402
from trl_runs import make_trainer  # noqa: E402

from vlm_dpo_plugins.manager import create_plugin_manager  # noqa: E402

DENSE_MASK = {"sharing": {"attention": "dense"}}
"""The traces were recorded with packed rows under a dense mask, which stays available."""
RUNS = {
    "llava-full-grad-nan": dict(model="llava", fault_at=1, plugin_config=DENSE_MASK),
    "qwen2_vl-lora": dict(
        model="qwen2_vl",
        fault_at=None,
        plugin_config=DENSE_MASK,
        peft_config=lambda: peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
    ),
    "llava-full-mdpo": dict(model="llava", fault_at=None, plugin_config={"loss": {"type": "mdpo"}}),
}


@pytest.mark.parametrize("name", RUNS)
def test_training_reproduces_the_recorded_trace(tiny_model_dirs, preference_rows, tmp_path, name):
    trainer = traced_run(tiny_model_dirs, preference_rows, tmp_path, RUNS[name])
    weights = {name: parameter for name, parameter in trainer.model.named_parameters()}
    check_trace(f"trl-{name}", step_trace(trainer.state.log_history), weights_digest(weights))


@pytest.mark.parametrize("name", ["llava-full-grad-nan", "qwen2_vl-lora"])
def test_the_mask_free_attention_follows_the_recorded_trace(tiny_model_dirs, preference_rows, tmp_path, name):
    trainer = traced_run(tiny_model_dirs, preference_rows, tmp_path, {**RUNS[name], "plugin_config": {}})
    follows_trace(f"trl-{name}", step_trace(trainer.state.log_history), tolerance=1e-5)


def traced_run(tiny_model_dirs, preference_rows, tmp_path, run):
    manager = create_plugin_manager(load_entry_points=False)
    if run["fault_at"] is not None:
        manager.register(FaultInjector("grad-nan", [run["fault_at"]]), name="test_fault_injection")
    extra = {"peft_config": run["peft_config"]()} if "peft_config" in run else {}
    trainer = make_trainer(
        tiny_model_dirs[run["model"]],
        preference_rows[:8],
        tmp_path,
        max_steps=4,
        learning_rate=1e-3,
        bf16=False,
        plugin_manager=manager,
        vlm_dpo_config=run["plugin_config"],
        **extra,
    )
    trainer.train()
    return trainer


def test_a_variant_a_plugin_only_registers_trains(tiny_model_dirs, preference_rows, tmp_path):
    import math

    from variant_plugin import VARIANT, DoubledSigmoid

    manager = create_plugin_manager(load_entry_points=False, extra_plugins={"variant": DoubledSigmoid()})
    trainer = make_trainer(
        tiny_model_dirs["llava"],
        preference_rows[:4],
        tmp_path,
        max_steps=2,
        bf16=False,
        plugin_manager=manager,
        vlm_dpo_config={"loss": {"type": VARIANT}},
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
    assert losses[0] == pytest.approx(2 * math.log(2), abs=1e-6)
    assert losses[1] != pytest.approx(2 * math.log(2), abs=1e-6)
