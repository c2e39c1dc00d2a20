"""Model families through ``swift rlhf``: as swift trains them alone, with the default freeze policy, packed like
two rows. LLaVA-1.5 (swift's ``llava1_5_hf``), Qwen2.5-VL and Qwen3-VL; Qwen2-VL's runs are in test_adapter_runs.

Qwen3-VL's DeepStack mergers sit inside ``visual`` next to its merger (swift's aligner); the vision tower and
both kinds of merger stay frozen by default.
"""

from __future__ import annotations

import pytest

pytest.importorskip("swift", reason="needs the ms-swift test environment (ms-swift==4.6.0)")

import yaml  # noqa: E402
from saved_models import live_weights  # noqa: E402

PACKED_LINE = "vlm-dpo: sharing.prompt: each pair runs as one row [prompt, chosen, rejected]"
UNSHARED = {"prompt": False, "vision_features": False}


SGD = ("--optim", "sgd", "--learning_rate", "0.1")
"""Plain SGD for the comparisons: AdamW would scale fp32 rounding in a near-zero gradient up to a full step."""
COMPARED = ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "rewards/rejected")


def plugin_run(
    tmp_path, swift_dpo, model, plugin_file, name, config=None, options=(), model_dir=None, dataset=None, env=None
):
    """Three steps of ``swift rlhf``; with ``plugin_file`` the plugins (``config`` as the file VLM_DPO_CONFIG names)."""
    extra_env = dict(env or {})
    if config is not None:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        extra_env["VLM_DPO_CONFIG"] = str(path)
    plugins = [] if plugin_file is None else ["--external_plugins", plugin_file]
    run = swift_dpo(
        model, max_steps=3, extra_args=[*options, *plugins], env_extra=extra_env, output_name=name,
        model_dir=model_dir, dataset=dataset,
    )  # fmt: skip
    assert run.returncode == 0, run.tail()
    assert len(run.logged_steps()) == 3, run.tail()
    return run


def assert_same_steps(ours, theirs, keys=COMPARED, tolerance=1e-5):
    for mine, other in zip(ours.logged_steps(), theirs.logged_steps(), strict=True):
        for key in keys:
            assert mine[key] == pytest.approx(other[key], abs=tolerance), (key, mine, other)


def assert_checks_found_nothing(run):
    for step in run.logged_steps():
        assert step["collation/warned_rows"] == step["collation/skipped_rows"] == 0, step


def assert_only_language_trained(model, run):
    """Vision tower and aligner unchanged in the checkpoint, the language model trained; all three parts exist."""
    before = live_weights(run.model_dir)
    after = live_weights(run.output_dir / "checkpoint-3")
    moved = {name for name in before if not before[name].equal(after[name])}
    assert moved and all(model.part(name) == "language" for name in moved), sorted(moved)
    assert {model.part(name) for name in before} == {"vision", "aligner", "language"}
    return before


def assert_logits_as_swift_logs_them(ours, swift_alone):
    """``logits/*`` of the plugins' loss are swift's (the mean logit that predicts each response token): compared
    at the first step, where the weights are the same; swift logs four significant digits."""
    mine, theirs = ours.logged_steps()[0], swift_alone.logged_steps()[0]
    for key in ("logits/chosen", "logits/rejected"):
        assert mine[key] == pytest.approx(theirs[key], rel=2e-3, abs=2e-7), (key, mine, theirs)


@pytest.mark.model_support("ms-swift", "stock")
@pytest.mark.model_support("ms-swift", "freeze")
@pytest.mark.model_support("ms-swift", "sharing")
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl"])
def test_a_family_trains_as_swift_alone_frozen_and_packed(tmp_path, request, swift_dpo, family, plugin_file):
    """Three runs on SGD: swift alone; the plugins' defaults (swift's own loss, the freeze policy); the plugins'
    sigmoid loss with packed rows, against swift's loss on two rows."""
    model = request.getfixturevalue(family)
    stock = plugin_run(tmp_path, swift_dpo, model, None, "stock", options=SGD)
    plugged = plugin_run(tmp_path, swift_dpo, model, plugin_file, "plugged", options=SGD, model_dir=stock.model_dir)
    swift_keys = ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected")
    assert_same_steps(plugged, stock, swift_keys, tolerance=1e-6)

    before = assert_only_language_trained(model, plugged)
    if family == "qwen3_vl":
        assert any("deepstack_merger_list" in name for name in before), "no DeepStack merger in the tiny model"

    loss = {"loss": {"type": "sigmoid"}}
    shared = plugin_run(tmp_path, swift_dpo, model, plugin_file, "shared", loss, SGD, model_dir=stock.model_dir)
    assert PACKED_LINE in shared.stdout + shared.stderr and PACKED_LINE not in plugged.stdout + plugged.stderr
    assert_same_steps(shared, stock)


@pytest.mark.model_support("ms-swift", "stock")
@pytest.mark.model_support("ms-swift", "freeze")
@pytest.mark.model_support("ms-swift", "sharing")
@pytest.mark.parametrize("family", ["llava_next", "mllama", "paligemma"])
def test_a_family_trains_packed_like_swift_alone(tmp_path, request, swift_dpo, family, plugin_file):
    """Two runs per family (CI time): swift alone, and the plugins with their loss, defaults and packed rows.

    Both on SGD, so the packed row, the plugins' sigmoid loss and swift's own loss on two rows meet within 1e-5.
    """
    model = request.getfixturevalue(family)
    stock = plugin_run(tmp_path, swift_dpo, model, None, "stock", options=SGD)
    loss = {"loss": {"type": "sigmoid"}}
    packed = plugin_run(tmp_path, swift_dpo, model, plugin_file, "packed", loss, SGD, model_dir=stock.model_dir)
    assert PACKED_LINE in packed.stdout + packed.stderr, packed.tail()
    # The checks read this family's tokens and images from swift's processor and find nothing wrong.
    assert_checks_found_nothing(packed)
    assert_same_steps(packed, stock)
    assert_logits_as_swift_logs_them(packed, stock)
    assert_only_language_trained(model, packed)


@pytest.fixture
def two_image_dataset(tmp_path, swift_dataset_writer):
    """Swift's rows with a second image in each prompt (the next row's, so the two differ): two ``<image>`` tags."""
    import json

    path = swift_dataset_writer(tmp_path / "two-images" / "train.jsonl", 4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for index, row in enumerate(rows):
        row["images"] = [*row["images"], rows[(index + 1) % len(rows)]["images"][0]]
        row["messages"][0]["content"] = "<image>" + row["messages"][0]["content"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.model_support("ms-swift", "multi-image")
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "mllama", "paligemma"])
def test_two_images_per_prompt_pack_like_two_rows(tmp_path, request, swift_dpo, family, plugin_file, two_image_dataset):
    model = request.getfixturevalue(family)
    loss = {"loss": {"type": "sigmoid"}}
    model_dir = model.build(tmp_path / "model")

    def train(name, config):
        return plugin_run(
            tmp_path, swift_dpo, model, plugin_file, name, config, SGD, model_dir=model_dir, dataset=two_image_dataset
        )

    shared = train("shared", loss)
    unshared = train("unshared", {**loss, "sharing": UNSHARED})
    text = shared.stdout + shared.stderr
    assert PACKED_LINE in text and "image-count-mismatch" not in text, shared.tail()
    assert_same_steps(shared, unshared)


@pytest.fixture
def video_dataset(tmp_path, swift_dataset_writer):
    """Swift's rows with a four-frame clip in each prompt instead of the image: a ``<video>`` tag and ``videos``."""
    import json

    from videos import write_clip

    path = swift_dataset_writer(tmp_path / "videos" / "train.jsonl", 4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for index, row in enumerate(rows):
        del row["images"]
        row["videos"] = [str(write_clip(path.parent / f"clip{index}.mp4", index))]
        row["messages"][0]["content"] = row["messages"][0]["content"].replace("<image>", "<video>")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# qwen-vl-utils reads the clips (decord: torchvision 0.29 has no read_video); a few tokens per frame pair.
VIDEO_ENV = {"VIDEO_MAX_PIXELS": "3136", "VIDEO_MIN_PIXELS": "784", "FPS": "2"}


@pytest.mark.model_support("ms-swift", "video")
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_a_video_per_prompt_trains_as_swift_alone_and_packs_like_two_rows(
    tmp_path, request, swift_dpo, family, plugin_file, video_dataset
):
    pytest.importorskip("decord", reason="qwen-vl-utils reads videos with decord here (the swift session has it)")
    model = request.getfixturevalue(family)
    model_dir = model.build(tmp_path / "model")

    def train(name, config):
        plugins = None if config is None else plugin_file
        return plugin_run(
            tmp_path, swift_dpo, model, plugins, name, config, SGD, model_dir=model_dir, dataset=video_dataset,
            env=VIDEO_ENV,
        )  # fmt: skip

    stock = train("stock", None)
    # Swift's printed example: the prompt holds a run of <|video_pad|> (id 151656) tokens.
    assert "<|vision_start|>[151656 * " in stock.stdout + stock.stderr, stock.tail()
    shared = train("shared", {"loss": {"type": "sigmoid"}})
    assert PACKED_LINE in shared.stdout + shared.stderr, shared.tail()
    assert_checks_found_nothing(shared)
    assert_same_steps(shared, stock)
    assert_logits_as_swift_logs_them(shared, stock)
