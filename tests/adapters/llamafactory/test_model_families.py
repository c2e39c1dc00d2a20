"""Model families through ``llamafactory-cli train``: LLaVA, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, Mllama, InternVL and
Mistral3, each as LLaMA-Factory trains it alone, with the default freeze policy, and with its pairs packed.

Two runs per family on the same data: LLaMA-Factory alone (two rows per pair) and the plugins with their defaults
(the default freeze policy, which trains what LLaMA-Factory's full tuning with its freeze flags trains, and one
packed row per pair); equal steps show both the same training and packed rows equal to two rows. Plain SGD, so the
comparisons are of the steps themselves: AdamW divides each gradient by its own running size, which turns the ~1e-6
relative rounding differences of summing log-probs in another order into ~1e-5 differences of the tiniest weights'
updates after two steps.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")

from llamafactory_runs import (  # noqa: E402
    TINY_MODELS,
    BuiltOnUse,
    changed_parts,
    dpo_config,
    run_llamafactory,
    write_dataset,
    write_video_dataset,
)
from safetensors.torch import load_file  # noqa: E402

DISABLED = {"VLM_DPO_LLAMAFACTORY": "0"}
UNSHARED = {"sharing": {"prompt": False, "vision_features": False}}
PACKED_LINE = "vlm-dpo: sharing.prompt: each pair runs as one row [prompt, chosen, rejected]"
COMPARED = ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "grad_norm")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return BuiltOnUse(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_dataset(directory)
    return directory


def train(tmp_path, models, dataset, family, env=None, **overrides):
    options = dict(pref_loss="sigmoid", optim="sgd", learning_rate=0.05, **overrides)
    config = dpo_config(TINY_MODELS[family], models[family], dataset, tmp_path / "out", "full", **options)
    run = run_llamafactory(tmp_path, config, env=env)
    assert run.returncode == 0, run.log()
    assert len(run.step_logs) == 3, run.log()
    return run


def assert_same_steps(ours, theirs):
    for mine, other in zip(ours.step_logs, theirs.step_logs, strict=True):
        for key in COMPARED:
            assert mine[key] == pytest.approx(other[key], abs=1e-5), (key, mine, other)


@pytest.mark.model_support("LLaMA-Factory", "stock")
@pytest.mark.model_support("LLaMA-Factory", "freeze")
@pytest.mark.model_support("LLaMA-Factory", "sharing")
@pytest.mark.parametrize(
    "family", ["llava", "qwen2_5_vl", "qwen3_vl", "llava_next", "mllama", "internvl", "mistral3", "paligemma"]
)
def test_a_family_trains_as_llamafactory_alone_and_packed_like_two_rows(tmp_path, models, dataset, family):
    stock = train(tmp_path / "stock", models, dataset, family, env=DISABLED)
    shared = train(tmp_path / "shared", models, dataset, family)
    assert PACKED_LINE in shared.output and PACKED_LINE not in stock.output, shared.log()
    assert_same_steps(shared, stock)

    before = load_file(models[family] / "model.safetensors")
    after = load_file(shared.output_dir / "model.safetensors")
    parts = changed_parts(before, after, TINY_MODELS[family].part)
    assert parts["vision"]["changed"] == [] and parts["projector"]["changed"] == [], parts
    assert parts["language"]["changed"], "the language model did not train"


@pytest.fixture(scope="module")
def two_image_dataset(tmp_path_factory):
    """The sharegpt rows with a second image in each prompt (the next row's, so the two differ)."""
    import json

    directory = tmp_path_factory.mktemp("two-images")
    write_dataset(directory)
    path = directory / "tiny_pref.json"
    rows = json.loads(path.read_text())
    for index, row in enumerate(rows):
        row["images"] = [*row["images"], rows[(index + 1) % len(rows)]["images"][0]]
        row["conversations"][0]["value"] = "<image>" + row["conversations"][0]["value"]
    path.write_text(json.dumps(rows, indent=1))
    return directory


@pytest.mark.model_support("LLaMA-Factory", "multi-image")
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl", "llava_next"])
def test_two_images_per_prompt_pack_like_two_rows(tmp_path, models, two_image_dataset, family):
    unshared = train(tmp_path / "unshared", models, two_image_dataset, family, vlm_dpo=UNSHARED)
    shared = train(tmp_path / "shared", models, two_image_dataset, family)
    assert PACKED_LINE in shared.output and "image-count-mismatch" not in shared.output, shared.log()
    assert_same_steps(shared, unshared)


@pytest.fixture(scope="module")
def video_dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("videos")
    write_video_dataset(directory)
    return directory


@pytest.mark.model_support("LLaMA-Factory", "video")
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_a_video_per_prompt_trains_as_llamafactory_alone_and_packs_like_two_rows(
    tmp_path, models, video_dataset, family
):
    """Qwen2-VL's videos reach the model as ``pixel_values_videos`` with a ``video_grid_thw`` row per video, and
    LLaMA-Factory's collator computes the 3D positions of the video tokens; the packed row keeps both."""
    video = {"video_max_pixels": 3136, "video_min_pixels": 784, "video_fps": 2.0}
    stock = train(tmp_path / "stock", models, video_dataset, family, env=DISABLED, **video)
    shared = train(tmp_path / "shared", models, video_dataset, family, **video)
    assert "<|video_pad|>" in stock.output, stock.log()  # LLaMA-Factory's printed example: the video's tokens
    assert PACKED_LINE in shared.output and PACKED_LINE not in stock.output, shared.log()
    assert_same_steps(shared, stock)
    assert all(step["collation/warned_rows"] == step["collation/skipped_rows"] == 0 for step in shared.step_logs)
