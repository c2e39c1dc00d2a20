"""`vlm-dpo train`, the main job: the tiny model by default, a model and a data file on request."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from framework_cli import console_script, isolated_env  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402
from vlm_dpo_plugins.demo.train_command import TrainOptions, run_train  # noqa: E402

from vlm_dpo_plugins.cli import main  # noqa: E402
from vlm_dpo_plugins.runlog.metrics import read_metrics  # noqa: E402
from vlm_dpo_plugins.tiny import build_tiny_llava, make_preference_examples, write_preference_images  # noqa: E402


def step_rows(output: str) -> list[list[str]]:
    lines = output.splitlines()
    header = next(index for index, line in enumerate(lines) if line.split()[:2] == ["step", "loss"])
    rows = []
    for line in lines[header + 1 :]:
        if not line.split() or not line.split()[0].isdigit():
            break
        rows.append(line.split())
    return rows


def test_console_script_trains_the_tiny_model_and_writes_metrics_and_plot(tmp_path):
    # The README's first command, as a user runs it: the installed console script in a clean environment.
    completed = subprocess.run(
        [console_script("vlm-dpo"), "train", "--output-dir", str(tmp_path / "out"), "--steps", "3"],
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    output = completed.stdout
    assert "vision" in output and "frozen" in output and "language" in output and "trainable" in output
    rows = step_rows(output)
    assert [int(row[0]) for row in rows] == [1, 2, 3]
    assert float(rows[0][1]) == pytest.approx(math.log(2), abs=1e-4)
    assert "frozen groups: vision, projector" in output
    assert "skipped optimizer steps: 0" in output and "0 finding(s)" in output

    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [record["step"] for record in records] == [1, 2, 3]
    assert {"loss", "rewards/margins", "rewards/accuracies", "grad_norm", "vlm_dpo/skipped_steps"} <= set(records[0])
    assert (tmp_path / "out" / "training.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_default_run_keeps_vision_and_projector_and_grows_the_margin(tmp_path, capsys):
    result = run_train(TrainOptions(output_dir=tmp_path))
    initial = dict(AutoModelForImageTextToText.from_pretrained(tmp_path / "tiny-llava").named_parameters())
    moved = {n for n, p in result.trainer.model.named_parameters() if not torch.equal(p.detach(), initial[n])}
    assert moved and all(name.startswith(("model.language_model.", "lm_head.")) for name in moved)
    margins = [record["rewards/margins"] for record in result.records]
    assert len(margins) == 12 and margins[-1] > margins[0] + 0.1


def write_data_file(tmp_path, rows: int = 6) -> tuple:
    examples = make_preference_examples(rows, seed=5)
    paths = write_preference_images(examples, tmp_path / "images")
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected, "images": [f"images/{p.name}"]})
            + "\n"
            for e, p in zip(examples, paths)
        )
    )
    return data


def test_model_and_data_options_train_that_model_on_that_file(tmp_path, capsys):
    model_dir = build_tiny_llava(tmp_path / "my-model", seed=7)
    data = write_data_file(tmp_path)
    exit_code = main(
        [
            "train",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--output-dir",
            str(tmp_path / "out"),
            "--steps",
            "2",
            "--batch-size",
            "3",
            "--learning-rate",
            "1e-3",
            "--device",
            "cpu",
        ]
    )
    output = capsys.readouterr().out
    assert exit_code == 0
    assert f"{model_dir}, 6 pairs from {data}" in output
    assert [int(row[0]) for row in step_rows(output)] == [1, 2]
    assert len(read_metrics(tmp_path / "out" / "metrics.jsonl")) == 2


def test_lora_option_trains_an_adapter_on_the_language_model_only(tmp_path, capsys):
    pytest.importorskip("peft")
    model_dir = build_tiny_llava(tmp_path / "my-model", seed=7)
    data = write_data_file(tmp_path)
    result = run_train(
        TrainOptions(model=str(model_dir), data=data, output_dir=tmp_path / "out", steps=2, lora_r=4, device="cpu")
    )
    trainable = [n for n, p in result.trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and "language_model" in name for name in trainable)


def test_a_bad_data_file_is_refused_naming_the_row_and_field(tmp_path, capsys):
    model_dir = build_tiny_llava(tmp_path / "my-model")
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "What color?", "chosen": "Red.", "images": ["missing.png"]}) + "\n")
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "row 0" in error and "rejected" in error


def test_model_without_data_is_refused(tmp_path, capsys):
    assert main(["train", "--model", "some/model", "--output-dir", str(tmp_path)]) == 2
    assert "--model and --data go together" in capsys.readouterr().err


def test_a_bad_plugin_config_is_refused_with_the_key(tmp_path, capsys):
    config = tmp_path / "plugins.yaml"
    config.write_text("guards:\n  max_grad_nrom: 1.0\n")
    assert main(["train", "--output-dir", str(tmp_path), "--config", str(config)]) == 2
    assert "unknown config key 'guards.max_grad_nrom'; did you mean 'guards.max_grad_norm'?" in capsys.readouterr().err


def test_any_registered_loss_variant_runs(tmp_path, capsys):
    config = tmp_path / "plugins.yaml"
    config.write_text("loss:\n  type: simpo\n")
    assert main(["train", "--output-dir", str(tmp_path), "--config", str(config), "--steps", "2"]) == 0
    assert "loss 'simpo'" in capsys.readouterr().out
