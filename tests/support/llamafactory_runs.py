"""Running the real ``llamafactory-cli train`` (stage ``dpo``) on tiny VLMs, and reading back what it wrote.

Nothing here imports LLaMA-Factory, torch or transformers at module level, so any test
environment can import it; the tests that use it skip without LLaMA-Factory.

    model_dir = TINY_MODELS["qwen2_vl"].build(tmp_path / "model")
    write_dataset(tmp_path / "data")
    config = dpo_config(TINY_MODELS["qwen2_vl"], model_dir, tmp_path / "data", tmp_path / "out", "lora",
                        pref_loss="hinge", vlm_dpo={"guards": {"spike_factor": None}})
    run = run_llamafactory(tmp_path, config)
    assert run.returncode == 0, run.log()
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from framework_cli import console_script, free_port, isolated_env

DATASET_NAME = "tiny_pref"
# LLaMA-Factory's sharegpt image placeholder; each template's mm_plugin expands it.
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class TinyModel:
    name: str
    template: str
    builder: str
    """``module:function`` in ``vlm_dpo_plugins.tiny`` that writes the model to a folder."""
    config: Mapping[str, Any]
    """Extra LLaMA-Factory keys this model needs on CPU."""
    vision_keys: tuple[str, ...]
    projector_keys: tuple[str, ...]
    """Substrings of weight names, as LLaMA-Factory's COMPOSITE_MODELS table matches them."""

    def build(self, directory: Path) -> Path:
        import importlib

        module, function = self.builder.split(":")
        return Path(getattr(importlib.import_module(module), function)(directory))

    def part(self, weight_name: str) -> str:
        # The projector test comes first: Qwen2-VL's merger lives inside "visual".
        if any(key in weight_name for key in self.projector_keys):
            return "projector"
        if any(key in weight_name for key in self.vision_keys):
            return "vision"
        return "language"


TINY_MODELS = {
    "llava": TinyModel(
        "llava",
        "llava",
        "vlm_dpo_plugins.tiny.llava:build_tiny_llava",
        {},
        vision_keys=("vision_tower",),
        projector_keys=("multi_modal_projector",),
    ),
    "qwen2_vl": TinyModel(
        "qwen2_vl",
        "qwen2_vl",
        "vlm_dpo_plugins.tiny.qwen2_vl:build_tiny_qwen2_vl",
        # A few image tokens per image: the tiny model's images are 28x28 at most after resizing.
        {"image_max_pixels": 3136, "image_min_pixels": 784},
        vision_keys=("visual",),
        projector_keys=("visual.merger",),
    ),
    "qwen2_5_vl": TinyModel(
        "qwen2_5_vl",
        "qwen2_vl",  # LLaMA-Factory serves Qwen2.5-VL with the qwen2_vl template
        "vlm_dpo_plugins.tiny.qwen2_5_vl:build_tiny_qwen2_5_vl",
        {"image_max_pixels": 3136, "image_min_pixels": 784},
        vision_keys=("visual",),
        projector_keys=("visual.merger",),
    ),
    "gemma3": TinyModel(
        "gemma3",
        "gemma3",
        "vlm_dpo_plugins.tiny.gemma3:build_tiny_gemma3",
        {},
        vision_keys=("vision_tower",),
        projector_keys=("multi_modal_projector",),
    ),
    "qwen3_vl": TinyModel(
        "qwen3_vl",
        "qwen3_vl",
        "vlm_dpo_plugins.tiny.qwen3_vl:build_tiny_qwen3_vl",
        {"image_max_pixels": 4096, "image_min_pixels": 1024},  # 16 px patches: up to 4 merged tokens per image
        vision_keys=("visual",),
        projector_keys=("visual.merger", "visual.deepstack_merger_list"),
    ),
    "llava_next": TinyModel(
        "llava_next",
        "llava_next",
        "vlm_dpo_plugins.tiny.llava_next:build_tiny_llava_next",
        {},
        vision_keys=("vision_tower",),
        projector_keys=("multi_modal_projector", "image_newline"),
    ),
    "mllama": TinyModel(
        "mllama",
        "mllama",
        "vlm_dpo_plugins.tiny.mllama:build_tiny_mllama",
        {},
        vision_keys=("vision_model",),
        projector_keys=("multi_modal_projector",),
    ),
    "internvl": TinyModel(
        "internvl",
        "intern_vl",
        "vlm_dpo_plugins.tiny.internvl:build_tiny_internvl",
        {},
        vision_keys=("vision_tower",),
        projector_keys=("multi_modal_projector",),
    ),
    "mistral3": TinyModel(
        "mistral3",
        "mistral_small",  # LLaMA-Factory serves Mistral3 (Pixtral encoder) with its Mistral Small template
        "vlm_dpo_plugins.tiny.mistral3:build_tiny_mistral3",
        {},
        vision_keys=("vision_tower",),
        projector_keys=("multi_modal_projector",),
    ),
    "paligemma": TinyModel(
        "paligemma",
        "paligemma",  # plain text rows: "{prompt}\n" after BOS, the image tokens in front
        "vlm_dpo_plugins.tiny.paligemma:build_tiny_paligemma",
        {},
        vision_keys=("vision_tower",),
        projector_keys=("multi_modal_projector",),
    ),
}


class BuiltOnUse(dict):
    """``{name: model folder}`` for ``TINY_MODELS``, each built the first time a test asks for it."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        self[name] = TINY_MODELS[name].build(self.root / name)
        return self[name]


def write_dataset(dataset_dir: Path, rows: list[dict] | None = None, num_rows: int = 6, seed: int = 0) -> None:
    """Sharegpt ranking rows with PNG images, and the ``dataset_info.json`` entry LLaMA-Factory reads them by."""
    from vlm_dpo_plugins.tiny.data import make_preference_examples, write_preference_images

    dataset_dir.mkdir(parents=True, exist_ok=True)
    if rows is None:
        examples = make_preference_examples(num_rows, seed=seed)
        image_paths = write_preference_images(examples, dataset_dir / "images")
        rows = [
            {
                "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}{example.prompt}"}],
                "chosen": {"from": "gpt", "value": example.chosen},
                "rejected": {"from": "gpt", "value": example.rejected},
                "images": [Path(path).relative_to(dataset_dir).as_posix()],
            }
            for example, path in zip(examples, image_paths, strict=True)
        ]
    (dataset_dir / f"{DATASET_NAME}.json").write_text(json.dumps(rows, indent=1))
    columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}
    info = {
        DATASET_NAME: {
            "file_name": f"{DATASET_NAME}.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": columns,
        }
    }
    (dataset_dir / "dataset_info.json").write_text(json.dumps(info, indent=1))


FSDP2_SETTINGS = {
    "llava": dict(
        fsdp="full_shard auto_wrap",
        # transformers 5.6 lists a CLIP text module among LLaVA's _no_split_modules, which accelerate's auto wrap
        # cannot find in a vision-only CLIP: the layer classes are named, as a user of that release names them.
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer", "CLIPEncoderLayer"]},
    ),
    "qwen2_vl": dict(
        fsdp="full_shard auto_wrap",
        # Qwen2-VL's vision block and decoder layer (its _no_split_modules in transformers 5.6), named as above.
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["Qwen2VLVisionBlock", "Qwen2VLDecoderLayer"]},
    ),
}
"""LLaMA-Factory's own FSDP2 path (``fsdp``/``fsdp_config`` in its YAML) for each tiny model."""


def write_mixed_dataset(directory: Path, rows: int = 4) -> Path:
    """Pairs with an image and text-only pairs, alternating."""
    from vlm_dpo_plugins.tiny.data import make_preference_examples, write_preference_images

    examples = make_preference_examples(rows, seed=0)
    paths = write_preference_images(examples, directory / "images")
    written = []
    for index, (example, path) in enumerate(zip(examples, paths, strict=True)):
        text_only = index % 2 == 1
        written.append(
            {
                "conversations": [
                    {"from": "human", "value": "Name a shape." if text_only else f"{IMAGE_PLACEHOLDER}{example.prompt}"}
                ],
                "chosen": {"from": "gpt", "value": example.chosen},
                "rejected": {"from": "gpt", "value": example.rejected},
                "images": [] if text_only else [path.relative_to(directory).as_posix()],
            }
        )
    write_dataset(directory, written)
    return directory


VIDEO_PLACEHOLDER = "<video>"


def write_video_dataset(dataset_dir: Path, num_rows: int = 6, seed: int = 0) -> None:
    """Sharegpt ranking rows whose prompt holds a four-frame video instead of an image."""
    from videos import write_clip

    from vlm_dpo_plugins.tiny.data import make_preference_examples

    examples = make_preference_examples(num_rows, seed=seed)
    rows = []
    for index, example in enumerate(examples):
        video = write_clip(dataset_dir / "videos" / f"clip{index}.mp4", index)
        rows.append({
            "conversations": [{"from": "human", "value": f"{VIDEO_PLACEHOLDER}{example.prompt}"}],
            "chosen": {"from": "gpt", "value": example.chosen},
            "rejected": {"from": "gpt", "value": example.rejected},
            "videos": [video.relative_to(dataset_dir).as_posix()],
        })  # fmt: skip
    write_dataset(dataset_dir, rows)
    info_path = dataset_dir / "dataset_info.json"
    info = json.loads(info_path.read_text())
    columns = info[DATASET_NAME]["columns"]
    del columns["images"]
    columns["videos"] = "videos"
    info_path.write_text(json.dumps(info, indent=1))


def dpo_config(
    model: TinyModel, model_dir: Path, dataset_dir: Path, output_dir: Path, finetuning_type: str, **overrides: Any
) -> dict[str, Any]:
    """A CPU, fp32, few-step DPO config; ``overrides`` win, and an override of ``None`` removes the key."""
    config: dict[str, Any] = {
        "model_name_or_path": str(model_dir),
        "stage": "dpo",
        "do_train": True,
        "finetuning_type": finetuning_type,
        "pref_beta": 0.1,
        "dataset": DATASET_NAME,
        "dataset_dir": str(dataset_dir),
        "template": model.template,
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
        "max_steps": 3,
        "lr_scheduler_type": "constant",
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "seed": 0,
        **model.config,
    }
    if finetuning_type == "lora":
        config.update(lora_target="all", lora_rank=8)
    config.update(overrides)
    return {key: value for key, value in config.items() if value is not None}


@dataclass
class LlamaFactoryRun:
    returncode: int
    stdout: str
    stderr: str
    output_dir: Path

    @property
    def log_history(self) -> list[dict]:
        state = self.output_dir / "trainer_state.json"
        return json.loads(state.read_text())["log_history"] if state.exists() else []

    @property
    def step_logs(self) -> list[dict]:
        """The per-step training entries of ``trainer_state.json`` (``logging_steps: 1``)."""
        return [entry for entry in self.log_history if "loss" in entry]

    @property
    def losses(self) -> list[float]:
        return [entry["loss"] for entry in self.step_logs]

    @property
    def trainer_log(self) -> list[dict]:
        path = self.output_dir / "trainer_log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def log(self) -> str:
        return f"rc={self.returncode}\n--- stdout ---\n{self.stdout[-5000:]}\n--- stderr ---\n{self.stderr[-5000:]}"


def run_llamafactory(
    tmp_path: Path,
    config: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    nproc: int | None = None,
    timeout: int = 300,
    name: str = "cfg",
) -> LlamaFactoryRun:
    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    config_path = tmp_path / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    extra = {"GRADIO_ANALYTICS_ENABLED": "False"}
    if nproc is not None:
        extra.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(nproc), MASTER_PORT=str(free_port()))
    extra.update(env or {})  # a launch of several "nodes" gives them one MASTER_PORT, NNODES and its NODE_RANK
    environment = isolated_env(tmp_path, extra)
    if nproc is not None:
        environment["PATH"] = os.pathsep.join([str(torchrun_beside_interpreter(tmp_path)), environment["PATH"]])
    completed = subprocess.run(
        [console_script("llamafactory-cli"), "train", str(config_path)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return LlamaFactoryRun(completed.returncode, completed.stdout, completed.stderr, Path(config["output_dir"]))


def torchrun_beside_interpreter(tmp_path: Path) -> Path:
    """A folder with a ``torchrun`` for this interpreter, for LLaMA-Factory's ``subprocess.run("torchrun ...")``.

    Test-environment workaround: the test matrix shares one torch installed with ``pip --target``
    (see noxfile.py), which leaves torch's console scripts out of each environment's ``bin``. A normal
    torch install puts ``torchrun`` there; this does the same for the tests only.
    """
    folder = tmp_path / "torchrun-bin"
    folder.mkdir(exist_ok=True)
    script = folder / "torchrun"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def changed_parts(
    before: Mapping[str, Any], after: Mapping[str, Any], part_of: Callable[[str], str]
) -> dict[str, dict[str, list[str]]]:
    """Per model part, the weight names that changed and those that did not."""
    import torch

    parts: dict[str, dict[str, list[str]]] = {}
    for name, tensor in before.items():
        entry = parts.setdefault(part_of(name), {"changed": [], "unchanged": []})
        entry["unchanged" if torch.equal(tensor, after[name]) else "changed"].append(name)
    return parts


def projector_weights(path: Path) -> dict[str, Any]:
    """The projector's tensors in a saved ``model.safetensors``, by their name inside the projector:
    transformers saves checkpoints under another prefix than the model folder's."""
    from safetensors.torch import load_file

    weights = load_file(path)
    return {name[name.index("multi_modal_projector") :]: weights[name] for name in weights if "projector" in name}


def assert_projector_trains_from(stage: int, model_dir: Path, output_dir: Path, last_step: int) -> dict[int, dict]:
    """The saved projector equals the model's until checkpoint ``stage`` (the steps before the stage), then differs;
    returns the checkpoints' projectors by step."""
    initial = projector_weights(model_dir / "model.safetensors")
    saved = {
        step: projector_weights(output_dir / f"checkpoint-{step}" / "model.safetensors")
        for step in range(1, last_step + 1)
    }
    assert initial and all(saved[step][name].equal(initial[name]) for step in range(1, stage + 1) for name in initial)
    assert any(not saved[last_step][name].equal(initial[name]) for name in initial), "the projector did not train"
    return saved
