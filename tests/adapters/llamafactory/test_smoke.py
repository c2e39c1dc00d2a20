"""Smoke test of the environment itself: stock LLaMA-Factory (adapter off) trains the tiny LLaVA with DPO.

If this fails, the adapter tests beside it cannot mean anything: the framework, its dependencies or
the tiny model do not work together here. Full fine-tuning, fp32 on CPU, two steps; LLaMA-Factory's
default flags freeze the vision tower and projector.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")

from llamafactory_runs import TINY_MODELS, changed_parts, dpo_config, run_llamafactory, write_dataset  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def test_stock_llava_dpo_two_steps_via_llamafactory_cli(tmp_path) -> None:
    llava = TINY_MODELS["llava"]
    model_dir = llava.build(tmp_path / "model")
    write_dataset(tmp_path / "data")
    config = dpo_config(llava, model_dir, tmp_path / "data", tmp_path / "out", "full", max_steps=2, pref_loss="sigmoid")
    run = run_llamafactory(tmp_path, config, env={"VLM_DPO_LLAMAFACTORY": "0"})
    assert run.returncode == 0, run.log()
    assert len(run.losses) == 2 and all(math.isfinite(loss) for loss in run.losses), run.log_history
    assert run.losses[0] == pytest.approx(math.log(2), abs=1e-3)  # the policy equals the reference at step 0
    before, after = load_file(model_dir / "model.safetensors"), load_file(run.output_dir / "model.safetensors")
    assert before.keys() == after.keys(), sorted(set(before) ^ set(after))
    parts = changed_parts(before, after, llava.part)
    assert parts["language"]["changed"], "no language-model weight changed after 2 DPO steps"
    assert parts["vision"]["changed"] == [] and parts["projector"]["changed"] == [], parts
