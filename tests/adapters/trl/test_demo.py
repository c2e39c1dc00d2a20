"""`vlm-dpo train`, the main job: trains through TRL with the plugins' freeze policy applied."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402
from vlm_dpo_plugins.adapters.trl.demo import run_demo  # noqa: E402

from vlm_dpo_plugins.cli import main  # noqa: E402


def test_train_prints_a_step_table_and_keeps_vision_and_projector_frozen(tmp_path, capsys):
    trainer = run_demo(tmp_path, steps=2, pairs=4)
    output = capsys.readouterr().out
    assert "vision" in output and "frozen" in output and "language" in output and "trainable" in output
    header = next(line for line in output.splitlines() if line.split()[:2] == ["step", "loss"])
    rows = output.splitlines()[output.splitlines().index(header) + 1 :][:2]
    assert [int(row.split()[0]) for row in rows] == [1, 2]
    assert float(rows[0].split()[1]) == pytest.approx(math.log(2), abs=1e-4)
    assert "summary: 0 finding(s)" in output

    # The demo saved the initial weights before training; compare the trained model with them.
    initial = dict(AutoModelForImageTextToText.from_pretrained(tmp_path / "tiny-llava").named_parameters())
    moved = {name for name, p in trainer.model.named_parameters() if not torch.equal(p.detach(), initial[name])}
    assert moved and all(name.startswith(("model.language_model.", "lm_head.")) for name in moved)


def test_train_rejects_a_bad_plugin_config_with_the_key(tmp_path, capsys):
    config = tmp_path / "plugins.yaml"
    config.write_text("guards:\n  max_grad_nrom: 1.0\n")
    assert main(["train", "--output-dir", str(tmp_path), "--config", str(config)]) == 2
    assert "unknown config key 'guards.max_grad_nrom'; did you mean 'guards.max_grad_norm'?" in capsys.readouterr().err


def test_train_refuses_a_loss_variant_trl_cannot_run(tmp_path, capsys):
    config = tmp_path / "plugins.yaml"
    config.write_text("loss:\n  type: simpo\n")
    assert main(["train", "--output-dir", str(tmp_path), "--config", str(config)]) == 2
    assert "'loss.type' is 'simpo', which the demo cannot run yet" in capsys.readouterr().err
