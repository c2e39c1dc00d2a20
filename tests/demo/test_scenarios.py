"""``vlm-dpo train --scenario NAME``: each failure reproduced with stock TRL, and prevented or named by the plugins."""

from __future__ import annotations

import io
import math

import pytest

pytest.importorskip("trl")

from vlm_dpo_plugins.demo.scenarios import PLUGINS, SCENARIOS, STOCK, run_scenario  # noqa: E402

from vlm_dpo_plugins.cli import main  # noqa: E402
from vlm_dpo_plugins.errors import ConfigError  # noqa: E402
from vlm_dpo_plugins.runlog.metrics import read_metrics  # noqa: E402


def run(name, tmp_path, **kwargs):
    out = io.StringIO()
    comparison = run_scenario(name, tmp_path, out=out, **kwargs)
    return comparison, out.getvalue()


def test_unfrozen_vision_moves_the_tower_in_stock_trl_and_the_frozen_run_learns_the_image_pairs(tmp_path):
    comparison, output = run("unfrozen-vision", tmp_path)
    measured = comparison.measured
    assert measured["stock_vision_change"] > 0.1 and measured["stock_projector_change"] > 0.5
    assert measured["plugin_vision_change"] == 0.0 and measured["plugin_projector_change"] == 0.0
    assert measured["plugin_language_change"] > 0.1
    # The symptom's direction at the default seed: the frozen run's margin grows, stock's stays well below it.
    assert measured["symptom_reproduced"]
    assert measured["plugin_final_margin"] > 2 * measured["stock_final_margin"]
    assert measured["plugin_final_loss"] < measured["stock_final_loss"]
    assert STOCK in output and PLUGINS in output and "reproduced at this seed" in output
    assert f"{100 * measured['stock_projector_change']:.1f}%" in output

    directory = tmp_path / "unfrozen-vision"
    assert (directory / "comparison.png").read_bytes().startswith(b"\x89PNG")
    for run_name, records in (("stock", comparison.stock.records), ("plugins", comparison.plugins.records)):
        logged = read_metrics(directory / run_name / "metrics.jsonl")
        assert [record["step"] for record in logged] == [record["step"] for record in records] == list(range(1, 21))


def test_identical_pairs_train_at_ln2_in_stock_trl_and_stop_before_step_0_with_the_plugins(tmp_path):
    comparison, output = run("identical-pairs", tmp_path, steps=3)
    losses = [record["loss"] for record in comparison.stock.records]
    assert len(losses) == 3 and all(loss == pytest.approx(math.log(2), abs=1e-6) for loss in losses)
    assert all(record["rewards/margins"] == 0.0 for record in comparison.stock.records)
    assert comparison.plugins.records == [] and comparison.plugins.error_rows == list(range(8))
    assert comparison.plugins.error.startswith("PairCheckError") and "identical-pair" in comparison.plugins.error
    assert "stopped before step 0 naming rows [0, 1, 2, 3, 4, 5, 6, 7]" in output
    assert (tmp_path / "identical-pairs" / "plugins" / "metrics.jsonl").read_text() == ""


def test_a_non_finite_gradient_poisons_stock_trl_and_is_skipped_by_the_plugins(tmp_path):
    comparison, output = run("bf16-overflow", tmp_path, steps=6)
    measured = comparison.measured
    assert measured["injected_step"] == 4
    assert measured["stock_non_finite_weights"] > measured["stock_total_weights"] // 2
    assert measured["stock_margins_after_all_nan"] and len(measured["stock_losses_after"]) == 2
    before = [record["rewards/margins"] for record in comparison.stock.records if record["step"] <= 4]
    assert all(math.isfinite(margin) for margin in before), "stock was finite until the injected step"

    assert measured["plugin_skipped_steps"] == 1 and measured["plugin_non_finite_weights"] == 0
    assert measured["plugin_losses_after_finite"]
    assert [record["vlm_dpo/skipped_steps"] for record in comparison.plugins.records] == [0, 0, 0, 1, 1, 1]
    assert comparison.plugins.records[3]["events"][0].startswith("skipped step 4")
    assert "injected" in output and "logging_nan_inf_filter" in output


def test_an_inert_lora_is_silent_in_stock_trl_and_named_by_the_plugins(tmp_path):
    pytest.importorskip("peft")
    comparison, output = run("lora-inert", tmp_path)
    measured = comparison.measured
    assert comparison.stock.findings is None, "stock TRL has no findings to report"
    assert measured["stock_steps"] == 12 and measured["stock_max_abs_reward"] < 1e-3
    assert measured["stock_max_loss_minus_ln2"] < 1e-4
    assert 0 < measured["stock_adapter_update"] < 1e-4

    [finding] = [finding for finding in comparison.plugins.findings if finding.code == "lora-inert"]
    assert [finding.code for finding in comparison.plugins.findings] == ["lora-inert"], "no second, generic ln 2 one"
    assert "r=32, lora_alpha=1 (effective scaling 0.0312)" in finding.message
    assert "learning rate 5e-07 (largest logged)" in finding.message
    assert "raise lora_alpha to r or 2r" in finding.fix and "instead of 5e-07" in finding.fix
    assert "reported lora-inert" in output


def test_every_scenario_has_the_lines_the_cli_shows_and_is_a_cli_choice(tmp_path, capsys):
    assert set(SCENARIOS) == {"unfrozen-vision", "identical-pairs", "bf16-overflow", "lora-inert"}
    for name, scenario in SCENARIOS.items():
        assert scenario.name == name
        assert all(text and "\n" not in text for text in (scenario.title, scenario.failure, scenario.fix))
    with pytest.raises(SystemExit):
        main(["train", "--scenario", "no-such-scenario", "--output-dir", str(tmp_path)])
    assert "invalid choice" in capsys.readouterr().err


def test_an_unknown_name_passed_to_the_api_names_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown scenario 'lora-inrt'.*did you mean 'lora-inert'"):
        run_scenario("lora-inrt", tmp_path)
