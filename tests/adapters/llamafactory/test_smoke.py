"""Smoke test: a tiny random-weight LLaVA trains 2 DPO steps through LLaMA-Factory's own CLI.

Runs ``llamafactory-cli train cfg.yaml`` as a subprocess (stage ``dpo``, template ``llava``,
full fine-tuning, fp32 on CPU) on a synthetic sharegpt ranking dataset with PNG images, then
checks the run on disk: finite logged loss, language-model weights moved, and the vision
tower (frozen by LLaMA-Factory's default ``freeze_vision_tower: true``) unchanged.

Only meaningful in the LLaMA-Factory test environment; skipped elsewhere.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")

import torch
from framework_cli import console_script, isolated_env
from safetensors.torch import load_file

from vlm_dpo_plugins.tiny.data import make_preference_examples, write_preference_images
from vlm_dpo_plugins.tiny.llava import build_tiny_llava

DATASET_NAME = "tiny_llava_pref"
NUM_ROWS = 6
MAX_STEPS = 2
# LLaMA-Factory's sharegpt placeholder; its LlavaPlugin expands each one to the image-token run.
IMAGE_PLACEHOLDER = "<image>"

# LLaMA-Factory's COMPOSITE_MODELS["llava"] keys; matched as substrings, as LLaMA-Factory does, so
# both checkpoint layouts work ("vision_tower.*" as transformers 5 saves it, "model.vision_tower.*").
VISION_KEY = "vision_tower"
PROJECTOR_KEY = "multi_modal_projector"


# --- data format converters -------------------------------------------------------------


def to_sharegpt_ranking_rows(examples, image_paths, dataset_dir: Path) -> list[dict]:
    """Convert preference examples into LLaMA-Factory's sharegpt *ranking* rows.

    One human turn (``<image>`` placeholder + question), then ``chosen``/``rejected`` as single
    ``gpt`` messages; image paths are relative to ``dataset_dir`` (LLaMA-Factory's ``media_dir``).
    """
    rows = []
    for example, image_path in zip(examples, image_paths, strict=True):
        rows.append(
            {
                "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}{example.prompt}"}],
                "chosen": {"from": "gpt", "value": example.chosen},
                "rejected": {"from": "gpt", "value": example.rejected},
                "images": [Path(image_path).relative_to(dataset_dir).as_posix()],
            }
        )
    return rows


def sharegpt_ranking_dataset_info(file_name: str) -> dict:
    """The ``dataset_info.json`` entry for a multimodal sharegpt preference file."""
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {
            "messages": "conversations",
            "chosen": "chosen",
            "rejected": "rejected",
            "images": "images",
        },
    }


def write_llamafactory_dataset(dataset_dir: Path, num_rows: int, seed: int = 0) -> None:
    examples = make_preference_examples(num_rows, seed=seed)
    image_paths = write_preference_images(examples, dataset_dir / "images")
    rows = to_sharegpt_ranking_rows(examples, image_paths, dataset_dir)
    (dataset_dir / f"{DATASET_NAME}.json").write_text(json.dumps(rows, indent=1))
    info = {DATASET_NAME: sharegpt_ranking_dataset_info(f"{DATASET_NAME}.json")}
    (dataset_dir / "dataset_info.json").write_text(json.dumps(info, indent=1))


def write_config(path: Path, model_dir: Path, dataset_dir: Path, output_dir: Path) -> None:
    import yaml

    config = {
        "model_name_or_path": str(model_dir),
        "trust_remote_code": False,
        "stage": "dpo",
        "do_train": True,
        "finetuning_type": "full",
        "pref_beta": 0.1,
        "pref_loss": "sigmoid",
        "dataset": DATASET_NAME,
        "dataset_dir": str(dataset_dir),
        "template": "llava",
        "cutoff_len": 256,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "plot_loss": False,
        "report_to": "none",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "max_steps": MAX_STEPS,
        "lr_scheduler_type": "constant",
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "seed": 0,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


# --- the test ----------------------------------------------------------------------------


def test_llava_dpo_two_steps_via_llamafactory_cli(tmp_path: Path) -> None:
    model_dir = build_tiny_llava(tmp_path / "model")
    dataset_dir = tmp_path / "data"
    write_llamafactory_dataset(dataset_dir, NUM_ROWS)
    output_dir = tmp_path / "out"
    config_path = tmp_path / "cfg.yaml"
    write_config(config_path, model_dir, dataset_dir, output_dir)

    started = time.monotonic()
    proc = subprocess.run(
        [console_script("llamafactory-cli"), "train", str(config_path)],
        check=False,
        cwd=tmp_path,
        env=isolated_env(tmp_path, {"GRADIO_ANALYTICS_ENABLED": "False"}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - started
    log = f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"llamafactory-cli train failed (rc={proc.returncode}, {elapsed:.1f}s)\n{log}"

    # The loss logged at every step (logging_steps=1) and the summary metrics are finite.
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS, log
    step_losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(step_losses) == MAX_STEPS, (state["log_history"], log)
    assert all(math.isfinite(loss) for loss in step_losses), step_losses
    # sigmoid DPO with the policy equal to the reference model starts at ln 2
    assert step_losses[0] == pytest.approx(math.log(2), abs=1e-3), step_losses
    train_results = json.loads((output_dir / "train_results.json").read_text())
    assert math.isfinite(train_results["train_loss"]), train_results

    # Full fine-tuning: the language model moved, the frozen vision tower did not.
    before = load_file(model_dir / "model.safetensors")
    after = load_file(output_dir / "model.safetensors")
    assert before.keys() == after.keys(), sorted(set(before) ^ set(after))

    def part(name: str) -> str:
        if VISION_KEY in name:
            return "vision"
        if PROJECTOR_KEY in name:
            return "projector"
        return "language"

    moved: dict[str, list[str]] = {"vision": [], "projector": [], "language": []}
    kept: dict[str, list[str]] = {"vision": [], "projector": [], "language": []}
    for name, tensor in before.items():
        (kept if torch.equal(tensor, after[name]) else moved)[part(name)].append(name)
    assert all(moved[key] or kept[key] for key in moved), f"a model part is missing: {sorted(before)}"
    # trainable by default (freeze_language_model: false)
    assert moved["language"], "no language-model weight changed after 2 DPO steps"
    # frozen by default (freeze_vision_tower / freeze_multi_modal_projector: true)
    assert not moved["vision"], f"frozen vision tower changed: {moved['vision']}"
    assert not moved["projector"], f"frozen projector changed: {moved['projector']}"
