"""Fixtures for the LLaMA-Factory tests: tiny models built once, a DPO run factory, which weights a run changed.

The plain harness (``TINY_MODELS``, ``write_dataset``, ``dpo_config``, ``run_llamafactory``) lives in
``tests/support/llamafactory_runs.py`` so test modules can import it; a conftest cannot be imported
(``--import-mode=importlib``). This file adds what needs pytest or knows about saved weights.

Nothing here imports LLaMA-Factory, torch or transformers at module level, so this conftest loads in
every test environment; the tests skip without LLaMA-Factory. No ``__init__.py`` in this folder.

    def test_example(llamafactory_dpo):
        run = llamafactory_dpo("qwen2_vl", "lora", env={"VLM_DPO_LLAMAFACTORY": "0"}, pref_loss="hinge")
        assert run.returncode == 0, run.log()
        assert run.changed_parts()["vision"] == {"changed": [], "unchanged": []}
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
from llamafactory_runs import TINY_MODELS, LlamaFactoryRun, TinyModel, dpo_config, run_llamafactory, write_dataset

PEFT_PREFIX = "base_model.model."
LORA_FACTOR_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B")
PARTS = ("vision", "projector", "language")


def weights_before(model_dir: Path, finetuning_type: str = "full") -> dict[str, Any]:
    """The model's initial tensors, named the way ``weights_after`` names them for ``finetuning_type``.

    Full: the saved ``model.safetensors`` names (LLaMA-Factory saves the same layout). LoRA: the
    in-memory names PEFT prefixes (transformers 5 renames on load, e.g. ``language_model.model.*`` →
    ``model.language_model.*``), which only ``modules_to_save`` copies are compared against.
    """
    if finetuning_type == "lora":
        import torch
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
        return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    from safetensors.torch import load_file

    return load_file(Path(model_dir) / "model.safetensors")


def weights_after(run_or_dir: LlamaFactoryRun | Path, finetuning_type: str) -> dict[str, Any]:
    """What a run saved (its ``output_dir``, or a ``checkpoint-N`` folder): the full model or the LoRA adapter."""
    from safetensors.torch import load_file

    folder = Path(run_or_dir.output_dir if isinstance(run_or_dir, LlamaFactoryRun) else run_or_dir)
    if finetuning_type != "lora":
        return load_file(folder / "model.safetensors")
    init = json.loads((folder / "adapter_config.json").read_text()).get("init_lora_weights")
    # changed_parts relies on PEFT's default init (one LoRA factor all zero); PiSSA, LoftQ, ... start elsewhere.
    assert init is True, f"init_lora_weights={init!r} in {folder}: changed_parts cannot tell trained adapters"
    return load_file(folder / "adapter_model.safetensors")


def changed_parts(before: Mapping[str, Any], after: Mapping[str, Any], model: TinyModel) -> dict[str, dict[str, list]]:
    """Per part (vision / projector / language), the names in ``after`` that changed and those that did not.

    Full tuning: every tensor against ``before`` (same names, same keys required).

    LoRA: an adapter ``X.lora_A``/``X.lora_B`` pair counts as changed when neither factor is all zero.
    PEFT's default init zeroes one factor (``lora_B`` for linear layers, ``lora_embedding_A`` for
    embeddings), so the pair starts at ΔW = 0 and only an optimizer update makes that factor nonzero;
    a frozen adapter keeps it exactly zero. The initial random factor cannot be compared (LLaMA-Factory
    saves no step-0 adapter), and it only moves after the zero one has. Both tensors of a pair are listed
    under the pair's verdict. ``modules_to_save`` copies (``additional_target``) start as the base weight
    and are compared against ``before`` from ``weights_before(model_dir, "lora")``.
    """
    import torch

    parts: dict[str, dict[str, list]] = {part: {"changed": [], "unchanged": []} for part in PARTS}

    def record(name: str, changed: bool) -> None:
        parts[model.part(name)]["changed" if changed else "unchanged"].append(name)

    lora_pairs: dict[str, list[str]] = {}
    for name in after:
        marker = next((marker for marker in LORA_FACTOR_MARKERS if marker in name), None)
        if marker is not None:
            lora_pairs.setdefault(name.split(marker)[0], []).append(name)
        elif name.startswith(PEFT_PREFIX):
            base_name = name.removeprefix(PEFT_PREFIX)
            assert base_name in before, f"{name}: no base weight {base_name!r} (weights_before(..., 'lora')?)"
            record(name, not torch.equal(before[base_name], after[name]))
        else:
            assert name in before, f"{name} is not in the initial weights"
            record(name, not torch.equal(before[name], after[name]))
    for names in lora_pairs.values():
        changed = all(torch.count_nonzero(after[name]) > 0 for name in names)
        for name in names:
            record(name, changed)
    if not lora_pairs:
        assert before.keys() == after.keys(), sorted(set(before) ^ set(after))
    return parts


@dataclass(kw_only=True)
class TinyDpoRun(LlamaFactoryRun):
    """A finished ``llamafactory-cli train`` run plus the tiny model and tuning type it trained."""

    model: TinyModel
    model_dir: Path
    finetuning_type: str

    def weights_before(self) -> dict[str, Any]:
        return weights_before(self.model_dir, self.finetuning_type)

    def weights_after(self, checkpoint: int | None = None) -> dict[str, Any]:
        folder = self.output_dir if checkpoint is None else self.output_dir / f"checkpoint-{checkpoint}"
        return weights_after(folder, self.finetuning_type)

    def changed_parts(self, checkpoint: int | None = None) -> dict[str, dict[str, list]]:
        return changed_parts(self.weights_before(), self.weights_after(checkpoint), self.model)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    """``tiny_model_dir(name)``: the tiny model's folder, built on first use and shared by the session."""

    @functools.cache
    def build(name: str) -> Path:
        return TINY_MODELS[name].build(tmp_path_factory.mktemp(f"model-{name}"))

    return build


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    """The default preference dataset (6 rows, seed 0), shared by the session: never write into it."""
    directory = tmp_path_factory.mktemp("data")
    write_dataset(directory)
    return directory


@pytest.fixture(scope="session")
def llava(tiny_model_dir) -> Path:
    """The tiny LLaVA's folder: the model of the fault, interruption, two-rank and DeepSpeed suites."""
    return tiny_model_dir("llava")


@pytest.fixture
def llamafactory_dpo(tmp_path, tiny_model_dir, tiny_dataset_dir) -> Callable[..., TinyDpoRun]:
    """Factory: run ``llamafactory-cli train`` (stage dpo) on a tiny model; returns a :class:`TinyDpoRun`.

    ``overrides`` go into ``dpo_config`` (any key, ``vlm_dpo={...}`` included; ``None`` drops a key).
    ``rows`` writes a dataset of exactly those rows (images from the default dataset stay reachable);
    ``dataset_dir`` uses a folder written by ``write_dataset``. ``env`` is added to the isolated
    environment (``VLM_DPO_LLAMAFACTORY=0``: LLaMA-Factory without the adapter); ``nproc`` uses its torchrun path.
    """

    def run(
        model_name: str,
        finetuning_type: str = "full",
        *,
        env: Mapping[str, str] | None = None,
        nproc: int | None = None,
        rows: list[dict] | None = None,
        dataset_dir: Path | None = None,
        name: str = "run",
        timeout: int = 300,
        **overrides: Any,
    ) -> TinyDpoRun:
        model = TINY_MODELS[model_name]
        model_dir = tiny_model_dir(model_name)
        run_dir = tmp_path / name
        if rows is not None:
            dataset_dir = run_dir / "data"
            write_dataset(dataset_dir, rows=_with_absolute_images(rows, tiny_dataset_dir))
        dataset_dir = dataset_dir or tiny_dataset_dir
        config = dpo_config(model, model_dir, dataset_dir, run_dir / "out", finetuning_type, **overrides)
        finished = run_llamafactory(run_dir, config, env=env, nproc=nproc, timeout=timeout)
        base = {field.name: getattr(finished, field.name) for field in fields(finished)}
        return TinyDpoRun(**base, model=model, model_dir=model_dir, finetuning_type=finetuning_type)

    return run


@pytest.fixture
def default_rows(tiny_dataset_dir) -> list[dict]:
    """A fresh copy of the default dataset's rows, to edit and pass back as ``llamafactory_dpo(rows=...)``."""
    info = json.loads((tiny_dataset_dir / "dataset_info.json").read_text())
    (entry,) = info.values()
    return json.loads((tiny_dataset_dir / entry["file_name"]).read_text())


def _with_absolute_images(rows: list[dict], images_root: Path) -> list[dict]:
    # Relative image paths resolve against dataset_dir; rows copied from the default dataset point into it.
    return [
        {**row, "images": [str(images_root / path) for path in row["images"]]} if row.get("images") else row
        for row in rows
    ]
