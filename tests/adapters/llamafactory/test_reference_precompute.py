"""``sharing.reference: precompute`` through ``llamafactory-cli train``: the same training as the live reference.

Full tuning: LLaMA-Factory's separate reference model scores the training set once and is released; LoRA: the
policy with its adapter off does, and the steps run no adapter-off pass. A second run sharing the cache folder
computes nothing again; two ranks split the pass and both train from every pair's entry.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("llamafactory")

from llamafactory_runs import TINY_MODELS, dpo_config, run_llamafactory, write_dataset  # noqa: E402

PASS_LINE = re.compile(r"sharing\.reference: precompute: (\d+) training pair\(s\): (\d+) computed, (\d+) read from")
RELEASED = "vlm-dpo: sharing.reference: the separate reference model is released from memory"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: TINY_MODELS[name].build(root / name) for name in ("llava", "qwen2_vl", "qwen2_5_vl")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_dataset(directory)
    return directory


def train(tmp_path, models, dataset, model, finetuning, sharing, nproc=None):
    options = {"max_steps": 6, "vlm_dpo": {"sharing": sharing}}
    config = dpo_config(TINY_MODELS[model], models[model], dataset, tmp_path / "out", finetuning, **options)
    return run_llamafactory(tmp_path, config, nproc=nproc)


def pass_counts(run) -> tuple[int, int, int]:
    found = PASS_LINE.findall(run.output)
    assert len(found) == 1, run.log()
    return tuple(int(number) for number in found[0])


@pytest.mark.model_support("LLaMA-Factory", "precompute")
@pytest.mark.parametrize(("model", "finetuning"), [("llava", "full"), ("qwen2_vl", "lora"), ("qwen2_5_vl", "lora")])
def test_precomputed_reference_trains_like_the_live_one(tmp_path, models, dataset, model, finetuning):
    cache = tmp_path / "reference-cache"
    precomputed = {"reference": "precompute", "reference_cache": str(cache)}
    first = train(tmp_path / "first", models, dataset, model, finetuning, precomputed)
    live = train(tmp_path / "live", models, dataset, model, finetuning, {})
    assert first.returncode == 0 and live.returncode == 0, first.log() + live.log()
    assert pass_counts(first) == (6, 6, 0)
    assert (RELEASED in first.output) == (finetuning == "full")
    assert len(first.step_logs) == len(live.step_logs) == 6  # three epochs over the six pairs
    for mine, theirs in zip(first.step_logs, live.step_logs, strict=True):
        for key in ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (key, mine, theirs)
    again = train(tmp_path / "again", models, dataset, model, finetuning, precomputed)
    assert again.returncode == 0, again.log()
    assert pass_counts(again) == (6, 0, 6)
    assert [entry["loss"] for entry in again.step_logs] == [entry["loss"] for entry in first.step_logs]
    assert len(list(cache.glob("reference-*.json"))) == 1


def test_two_ranks_split_the_pass_and_train_from_every_entry(tmp_path, models, dataset):
    precomputed = {"reference": "precompute"}
    two = train(tmp_path / "two", models, dataset, "llava", "full", precomputed, nproc=2)
    live = train(tmp_path / "live", models, dataset, "llava", "full", {}, nproc=2)
    assert two.returncode == 0 and live.returncode == 0, two.log() + live.log()
    assert PASS_LINE.search(two.output).groups() == ("6", "6", "0"), two.log()  # rank 0's line: every pair
    for mine, theirs in zip(two.step_logs, live.step_logs, strict=True):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (key, mine, theirs)
