"""`vlm-dpo train --scenario NAME`: each failure reproduced with stock TRL and prevented or named by the plugins."""

from __future__ import annotations

import io
import math

import pytest

pytest.importorskip("trl")

from vlm_dpo_plugins.adapters.trl.scenarios import PLUGINS, SCENARIOS, STOCK, run_scenario  # noqa: E402

from vlm_dpo_plugins.cli import main  # noqa: E402


def run(name, tmp_path, **kwargs):
    out = io.StringIO()
    comparison = run_scenario(name, tmp_path, out=out, **kwargs)
    return comparison, out.getvalue()


def test_unfrozen_vision_moves_the_tower_in_stock_trl_and_not_with_the_plugins(tmp_path):
    comparison, output = run("unfrozen-vision", tmp_path, steps=4)
    assert comparison.stock.moved["vision"] > 0.01 and comparison.stock.moved["projector"] > 0.01
    assert comparison.plugins.moved["vision"] == 0.0 and comparison.plugins.moved["projector"] == 0.0
    assert comparison.plugins.moved["language"] > 0.01
    assert STOCK in output and PLUGINS in output and "verdict:" in output
    assert (tmp_path / "unfrozen-vision" / "comparison.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "unfrozen-vision" / "stock" / "metrics.jsonl").exists()


def test_identical_pairs_train_at_ln2_in_stock_trl_and_stop_before_step_0_with_the_plugins(tmp_path):
    comparison, output = run("identical-pairs", tmp_path, steps=3)
    losses = [record["loss"] for record in comparison.stock.records]
    assert len(losses) == 3 and all(loss == pytest.approx(math.log(2), abs=1e-6) for loss in losses)
    assert comparison.plugins.records == []
    assert "identical-pair" in comparison.plugins.error and "16 row(s)" in comparison.plugins.error
    assert "stopped before step 0" in output


def test_a_non_finite_gradient_poisons_stock_trl_and_is_skipped_by_the_plugins(tmp_path):
    comparison, _ = run("bf16-overflow", tmp_path, steps=6)
    assert not comparison.stock.finite_weights
    assert any(not math.isfinite(record["rewards/margins"]) for record in comparison.stock.records)
    assert comparison.plugins.finite_weights and comparison.plugins.skipped_steps == 1
    assert all(math.isfinite(record["rewards/margins"]) for record in comparison.plugins.records)
    assert [record["events"] for record in comparison.plugins.records][3][0].startswith("skipped step 4")


def test_an_inert_lora_is_silent_in_stock_trl_and_named_by_the_plugins(tmp_path):
    pytest.importorskip("peft")
    comparison, _ = run("lora-inert", tmp_path)
    assert comparison.stock.findings == []
    assert len(comparison.plugins.findings) == 1
    finding = comparison.plugins.findings[0]
    assert "lora-inert" in finding and "lora_alpha=1" in finding and "r=64" in finding


def test_every_scenario_is_a_cli_choice(tmp_path, capsys):
    assert set(SCENARIOS) == {"unfrozen-vision", "identical-pairs", "bf16-overflow", "lora-inert"}
    with pytest.raises(SystemExit):
        main(["train", "--scenario", "no-such-scenario", "--output-dir", str(tmp_path)])
    assert "invalid choice" in capsys.readouterr().err
