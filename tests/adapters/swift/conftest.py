"""Helpers for the ms-swift adapter tests: tiny models swift can load, swift-format data, a clean CLI run.

Nothing here imports ``swift`` (or ``torch``/``transformers``) at module level, so this
conftest loads in every test environment; the tests themselves skip without swift.

This folder deliberately has no ``__init__.py``: with pytest's default ``prepend``
import mode an ``__init__.py`` here (and none in ``tests/adapters``) would put
``tests/adapters`` on ``sys.path`` and this folder would shadow the real ``swift``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from framework_cli import console_script, isolated_env
from saved_models import live_weights

FATAL_LINE = re.compile(r"terminate called|what\(\):|Fatal Python error|Aborted|Segmentation fault|gloo|Traceback")

# swift's generic image tag in ``messages`` content; each template replaces it with its own tokens.
SWIFT_IMAGE_TAG = "<image>"


@dataclass(frozen=True)
class SwiftTinyModel:
    """A tiny random-weight VLM builder plus what ``swift rlhf`` needs to serve it.

    ``vision_key``/``aligner_key`` are patterns searched in the *saved* safetensors key names
    (transformers 5 saves the legacy layout, e.g. ``vision_tower.*``, ``visual.merger.*``);
    every other key counts as the language model.
    """

    name: str
    builder: str  # "module:function", imported when built so this conftest stays import-light
    model_type: str
    template: str
    vision_key: str
    aligner_key: str
    extra_args: tuple[str, ...] = ()

    def build(self, directory: Path) -> Path:
        module_name, _, func_name = self.builder.partition(":")
        return Path(getattr(importlib.import_module(module_name), func_name)(directory))

    def part(self, key: str) -> str:
        # The aligner check comes first: for Qwen2-VL the merger sits inside ``visual``.
        if re.search(self.aligner_key, key):
            return "aligner"
        if re.search(self.vision_key, key):
            return "vision"
        return "language"


TINY_LLAVA = SwiftTinyModel(
    name="llava",
    builder="vlm_dpo_plugins.tiny.llava:build_tiny_llava",
    # swift 4.6.0 registers llava-hf/llava-1.5-*-hf as model_type ``llava1_5_hf`` (LlavaForConditionalGeneration,
    # ModelArch.llava_hf) with the ``llava1_5_hf`` template ("<s>USER: <image>\n{q}\nASSISTANT:{a}</s>").
    model_type="llava1_5_hf",
    template="llava1_5_hf",
    vision_key="vision_tower",
    aligner_key="multi_modal_projector",
)

TINY_QWEN2_VL = SwiftTinyModel(
    name="qwen2_vl",
    builder="vlm_dpo_plugins.tiny.qwen2_vl:build_tiny_qwen2_vl",
    # the qwen2_vl template hard-codes <|image_pad|>=151655 / <|video_pad|>=151656; the builder pins them
    model_type="qwen2_vl",
    template="qwen2_vl",
    vision_key="visual",
    aligner_key="visual.merger",
)

TINY_QWEN2_5_VL = SwiftTinyModel(
    name="qwen2_5_vl",
    builder="vlm_dpo_plugins.tiny.qwen2_5_vl:build_tiny_qwen2_5_vl",
    # the same pinned <|image_pad|>/<|video_pad|> ids and chat template as Qwen2-VL's
    model_type="qwen2_5_vl",
    template="qwen2_5_vl",
    vision_key="visual",
    aligner_key="visual.merger",
)
"""Not in ``SWIFT_TINY_MODELS``: the tests that run every model stay at two; the DDP report's setting runs it."""

TINY_QWEN3_VL = SwiftTinyModel(
    name="qwen3_vl",
    builder="vlm_dpo_plugins.tiny.qwen3_vl:build_tiny_qwen3_vl",
    # Qwen's special ids again; 16 px patches with DeepStack mergers inside ``visual``
    model_type="qwen3_vl",
    template="qwen3_vl",
    vision_key="visual",
    aligner_key="merger",
)
"""Not in ``SWIFT_TINY_MODELS`` either: ``test_model_families.py`` runs it, with Qwen2.5-VL and LLaVA."""

# Each family below under the model type and template swift 4.6.0 registers for its real checkpoints.
TINY_LLAVA_NEXT = SwiftTinyModel(
    name="llava_next",
    builder="vlm_dpo_plugins.tiny.llava_next:build_tiny_llava_next",
    model_type="llava1_6_vicuna_hf",  # LlavaNextForConditionalGeneration, "USER: <image>\n{q} ASSISTANT:"
    template="llava1_6_vicuna_hf",
    vision_key="vision_tower",
    # The learned row separator goes with the projector in the freeze policy; swift's aligner is the projector alone.
    aligner_key="multi_modal_projector|image_newline",
)

TINY_MLLAMA = SwiftTinyModel(
    name="mllama",
    builder="vlm_dpo_plugins.tiny.mllama:build_tiny_mllama",
    model_type="llama3_2_vision",  # its template encodes the whole row, cross_attention_mask at full length
    template="llama3_2_vision",
    vision_key="vision_model",
    aligner_key="multi_modal_projector",
)

TINY_PALIGEMMA = SwiftTinyModel(
    name="paligemma",
    builder="vlm_dpo_plugins.tiny.paligemma:build_tiny_paligemma",
    model_type="paligemma",  # the prompt as prefix, the response as suffix (token_type_ids)
    template="paligemma",
    vision_key="vision_tower",
    aligner_key="multi_modal_projector",
)


# --- data --------------------------------------------------------------------------------


def to_swift_rows(examples: Iterable, image_paths: Sequence[Path], *, identical: bool = False) -> list[dict]:
    """Preference examples as swift's standard RLHF rows.

    ``messages`` holds the user turn (``<image>`` tag + question) and the chosen assistant
    answer; ``rejected_response`` the rejected answer; ``images`` absolute paths.
    """
    rows = []
    for example, image_path in zip(examples, image_paths, strict=True):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"{SWIFT_IMAGE_TAG}{example.prompt}"},
                    {"role": "assistant", "content": example.chosen},
                ],
                "rejected_response": example.chosen if identical else example.rejected,
                "images": [str(Path(image_path).resolve())],
            }
        )
    return rows


def write_swift_dataset(path: Path, num_rows: int, seed: int = 0, *, identical: bool = False) -> Path:
    """Write ``num_rows`` synthetic image preference rows as JSONL (images as PNG next to it)."""
    from vlm_dpo_plugins.tiny.data import make_preference_examples, write_preference_images

    path.parent.mkdir(parents=True, exist_ok=True)
    examples = make_preference_examples(num_rows, seed=seed)
    image_paths = write_preference_images(examples, path.parent / "images")
    with path.open("w") as handle:
        for row in to_swift_rows(examples, image_paths, identical=identical):
            handle.write(json.dumps(row) + "\n")
    return path


# --- running swift ---------------------------------------------------------------------------


def dpo_args(
    model: SwiftTinyModel,
    model_dir: Path,
    dataset: Path,
    output_dir: Path,
    *,
    max_steps: int,
    batch_size: int,
) -> list[str]:
    """``swift rlhf`` arguments for a short, deterministic full-parameter DPO run on CPU."""
    return [
        "rlhf",
        "--rlhf_type", "dpo",
        "--model", str(model_dir),
        "--model_type", model.model_type,
        "--template", model.template,
        "--check_model", "false",
        "--tuner_type", "full",
        "--torch_dtype", "float32",
        "--dataset", str(dataset),
        "--split_dataset_ratio", "0",
        "--dataset_num_proc", "1",
        "--dataloader_num_workers", "0",
        "--max_length", "256",
        "--per_device_train_batch_size", str(batch_size),
        "--gradient_accumulation_steps", "1",  # swift's default aims at a global batch of 16
        "--max_steps", str(max_steps),
        "--learning_rate", "1e-3",
        "--lr_scheduler_type", "constant",
        "--warmup_ratio", "0",
        # no decoupled weight decay: then a weight moves only if it got a gradient
        "--weight_decay", "0",
        # --beta and --loss_type stay unwritten (swift's defaults 0.1 and sigmoid): the plugin config may set them
        "--seed", "0",
        "--logging_steps", "1",
        "--save_strategy", "steps",
        "--save_steps", str(max_steps),
        "--save_only_model", "true",
        "--add_version", "false",  # output_dir is used as given (no v0-<timestamp> subfolder)
        "--report_to", "none",
        "--output_dir", str(output_dir),
        *model.extra_args,
    ]  # fmt: skip


@dataclass
class SwiftRun:
    """What one ``swift rlhf`` subprocess left behind."""

    returncode: int
    seconds: float
    stdout: str
    stderr: str
    output_dir: Path
    command: list[str] = field(default_factory=list)
    timed_out: bool = False
    model: SwiftTinyModel | None = None
    model_dir: Path | None = None

    def tail(self, chars: int = 6000) -> str:
        command = " ".join(self.command)
        # A worker's own last words (a C++ abort, a fatal signal) scroll away under torchrun's long traceback.
        fatal = [line for line in (self.stdout + self.stderr).splitlines() if FATAL_LINE.search(line)]
        last_words = "--- fatal lines ---\n" + "\n".join(fatal[:40]) + "\n" if fatal else ""
        streams = f"--- stdout ---\n{self.stdout[-chars:]}\n--- stderr ---\n{self.stderr[-chars:]}"
        return f"$ {command}\n{last_words}{streams}"

    def last_checkpoint(self) -> Path:
        checkpoints = sorted(self.output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
        assert checkpoints, f"no checkpoint-* under {self.output_dir}\n{self.tail()}"
        return checkpoints[-1]

    def trainer_state(self) -> dict:
        return json.loads((self.last_checkpoint() / "trainer_state.json").read_text())

    def args_json(self) -> dict:
        """The resolved arguments swift saved (``args.json``): what the run really used."""
        return json.loads((self.output_dir / "args.json").read_text())

    def logged_steps(self) -> list[dict]:
        """Per-step log entries (with ``loss``) from swift's ``logging.jsonl``."""
        path = self.output_dir / "logging.jsonl"
        assert path.exists(), f"swift wrote no {path}\n{self.tail()}"
        entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [entry for entry in entries if "loss" in entry]

    def weight_changes(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """(moved, kept): saved tensor names per model part (vision/aligner/language) that differ / are equal."""
        import torch

        assert self.model is not None and self.model_dir is not None
        before = live_weights(self.model_dir)
        after = live_weights(self.last_checkpoint())
        assert before.keys() == after.keys(), sorted(set(before) ^ set(after))
        moved: dict[str, list[str]] = {"vision": [], "aligner": [], "language": []}
        kept: dict[str, list[str]] = {"vision": [], "aligner": [], "language": []}
        for name, tensor in before.items():
            (kept if torch.equal(tensor, after[name]) else moved)[self.model.part(name)].append(name)
        return moved, kept


def run_swift(
    args: Sequence[str],
    tmp_path: Path,
    output_dir: Path,
    *,
    env_extra: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> SwiftRun:
    """One ``swift`` command; past ``timeout`` seconds its whole process group (torchrun and every rank) is killed and
    the run comes back with ``timed_out`` set (a hang is what some runs show)."""
    command = [console_script("swift"), *args]
    started = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,  # never a folder holding a ``swift/`` directory (this one is tests/adapters/swift)
        env=isolated_env(tmp_path, env_extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the ranks in the group of their own that a timeout kills
    )
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    seconds = time.monotonic() - started
    return SwiftRun(proc.returncode, seconds, stdout, stderr, output_dir, command, timed_out=timed_out)


# --- fixtures -------------------------------------------------------------------------------


SWIFT_TINY_MODELS = {model.name: model for model in (TINY_LLAVA, TINY_QWEN2_VL)}


@pytest.fixture(scope="session")
def swift_tiny_models() -> dict[str, SwiftTinyModel]:
    """The tiny models by name, for tests that pick one (test modules cannot import this conftest)."""
    return dict(SWIFT_TINY_MODELS)


@pytest.fixture(scope="session")
def swift_dataset_writer() -> Callable[..., Path]:
    """``write_swift_dataset(path, num_rows, seed=0, *, identical=False)``, for tests that need data but no run."""
    return write_swift_dataset


@pytest.fixture(params=list(SWIFT_TINY_MODELS.values()), ids=lambda m: m.name)
def swift_tiny_model(request) -> SwiftTinyModel:
    """Each tiny VLM swift can serve; a test using this runs once per model."""
    return request.param


@pytest.fixture
def swift_dpo(tmp_path: Path) -> Callable[..., SwiftRun]:
    """Factory: build ``model`` in ``tmp_path``, write data, run ``swift rlhf --rlhf_type dpo``.

    ``extra_args`` (e.g. ``["--external_plugins", FILE]``) and ``env_extra`` are appended to the
    command line / environment; ``identical_pairs`` writes every rejected answer equal to the chosen one
    (swift's preprocessing then drops those rows); ``output_name`` is the output folder's name in ``tmp_path``;
    ``dataset`` a JSONL file to train on instead of the written one; ``model_dir`` a model built already (several
    launches at once, as the nodes of one run, must not build it each).
    Returns the :class:`SwiftRun` (the caller asserts on it).
    """

    def run(
        model: SwiftTinyModel,
        *,
        num_rows: int = 4,
        max_steps: int = 2,
        batch_size: int = 2,
        extra_args: Sequence[str] = (),
        env_extra: Mapping[str, str] | None = None,
        timeout: float = 300,
        identical_pairs: bool = False,
        output_name: str = "out",
        dataset: Path | None = None,
        model_dir: Path | None = None,
    ) -> SwiftRun:
        model_dir = model_dir or model.build(tmp_path / "model")
        if dataset is None:
            dataset = write_swift_dataset(tmp_path / "data" / "train.jsonl", num_rows, identical=identical_pairs)
        output_dir = tmp_path / output_name
        args = dpo_args(model, model_dir, dataset, output_dir, max_steps=max_steps, batch_size=batch_size)
        result = run_swift([*args, *extra_args], tmp_path, output_dir, env_extra=env_extra, timeout=timeout)
        result.model, result.model_dir = model, model_dir
        return result

    return run


@pytest.fixture(scope="session")
def plugin_file() -> str:
    """The path the documented command line passes: ``--external_plugins "$(vlm-dpo swift-plugin)"``."""
    command = Path(sys.executable).parent / "vlm-dpo"
    path = subprocess.run([str(command), "swift-plugin"], capture_output=True, text=True, check=True).stdout.strip()
    assert Path(path).is_file() and path.endswith(".py"), path
    return path


@pytest.fixture
def qwen2_vl(swift_tiny_models):
    return swift_tiny_models["qwen2_vl"]


@pytest.fixture
def qwen2_5_vl():
    return TINY_QWEN2_5_VL


@pytest.fixture
def qwen3_vl():
    return TINY_QWEN3_VL


@pytest.fixture
def llava(swift_tiny_models):
    return swift_tiny_models["llava"]


@pytest.fixture
def llava_next():
    return TINY_LLAVA_NEXT


@pytest.fixture
def mllama():
    return TINY_MLLAMA


@pytest.fixture
def paligemma():
    return TINY_PALIGEMMA
