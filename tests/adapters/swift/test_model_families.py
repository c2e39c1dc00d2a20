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


def plugin_run(tmp_path, swift_dpo, model, plugin_file, name, config=None, options=(), model_dir=None):
    extra_env = {}
    if config is not None:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        extra_env["VLM_DPO_CONFIG"] = str(path)
    plugins = [] if plugin_file is None else ["--external_plugins", plugin_file]
    run = swift_dpo(
        model, max_steps=3, extra_args=[*options, *plugins], env_extra=extra_env, output_name=name, model_dir=model_dir
    )
    assert run.returncode == 0, run.tail()
    assert len(run.logged_steps()) == 3, run.tail()
    return run


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
    model = request.getfixturevalue(family)
    stock = plugin_run(tmp_path, swift_dpo, model, None, "stock")
    plugged = plugin_run(tmp_path, swift_dpo, model, plugin_file, "plugged", model_dir=stock.model_dir)
    for mine, theirs in zip(plugged.logged_steps(), stock.logged_steps(), strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-6), (key, mine, theirs)

    before = live_weights(plugged.model_dir)
    after = live_weights(plugged.output_dir / "checkpoint-3")
    moved = {name for name in before if not before[name].equal(after[name])}
    assert moved and all(model.part(name) == "language" for name in moved), sorted(moved)
    assert {model.part(name) for name in before} == {"vision", "aligner", "language"}
    if family == "qwen3_vl":
        assert any("deepstack_merger_list" in name for name in before), "no DeepStack merger in the tiny model"

    # The plugins' loss, packed against two rows; SGD, so fp32 rounding is not scaled up to a full AdamW step.
    sgd = ["--optim", "sgd", "--learning_rate", "0.1"]
    loss = {"loss": {"type": "sigmoid"}}
    shared = plugin_run(tmp_path, swift_dpo, model, plugin_file, "shared", loss, sgd, model_dir=stock.model_dir)
    unshared = {**loss, "sharing": UNSHARED}
    unshared = plugin_run(tmp_path, swift_dpo, model, plugin_file, "unshared", unshared, sgd, model_dir=stock.model_dir)
    assert PACKED_LINE in shared.stdout + shared.stderr and PACKED_LINE not in unshared.stdout + unshared.stderr
    for mine, theirs in zip(shared.logged_steps(), unshared.logged_steps(), strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (key, mine, theirs)


@pytest.mark.model_support("ms-swift", "stock")
@pytest.mark.model_support("ms-swift", "freeze")
@pytest.mark.model_support("ms-swift", "sharing")
@pytest.mark.parametrize("family", ["llava_next", "mllama", "paligemma"])
def test_a_family_trains_packed_like_swift_alone(tmp_path, request, swift_dpo, family, plugin_file):
    """Two runs per family (CI time): swift alone, and the plugins with their loss, defaults and packed rows.

    Both on SGD, so the packed row, the plugins' sigmoid loss and swift's own loss on two rows meet within 1e-5.
    """
    model = request.getfixturevalue(family)
    sgd = ["--optim", "sgd", "--learning_rate", "0.1"]
    stock = plugin_run(tmp_path, swift_dpo, model, None, "stock", options=sgd)
    loss = {"loss": {"type": "sigmoid"}}
    packed = plugin_run(tmp_path, swift_dpo, model, plugin_file, "packed", loss, sgd, model_dir=stock.model_dir)
    text = packed.stdout + packed.stderr
    assert PACKED_LINE in text, packed.tail()
    for mine, theirs in zip(packed.logged_steps(), stock.logged_steps(), strict=True):
        # The checks read this family's tokens and images from swift's processor and find nothing wrong.
        assert mine["collation/warned_rows"] == mine["collation/skipped_rows"] == 0, mine
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (key, mine, theirs)
    assert_logits_as_swift_logs_them(packed, stock)

    before = live_weights(packed.model_dir)
    after = live_weights(packed.output_dir / "checkpoint-3")
    moved = {name for name in before if not before[name].equal(after[name])}
    assert moved and all(model.part(name) == "language" for name in moved), sorted(moved)
    assert {model.part(name) for name in before} == {"vision", "aligner", "language"}


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
    sgd = ["--optim", "sgd", "--learning_rate", "0.1"]
    loss = {"loss": {"type": "sigmoid"}}
    model_dir = model.build(tmp_path / "model")

    def train(name, config):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        run = swift_dpo(
            model, max_steps=3, extra_args=[*sgd, "--external_plugins", plugin_file], output_name=name,
            env_extra={"VLM_DPO_CONFIG": str(path)}, dataset=two_image_dataset, model_dir=model_dir,
        )  # fmt: skip
        assert run.returncode == 0, run.tail()
        assert len(run.logged_steps()) == 3, run.tail()
        return run

    shared = train("shared", loss)
    unshared = train("unshared", {**loss, "sharing": UNSHARED})
    text = shared.stdout + shared.stderr
    assert PACKED_LINE in text and "image-count-mismatch" not in text, shared.tail()
    for mine, theirs in zip(shared.logged_steps(), unshared.logged_steps(), strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (key, mine, theirs)


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
    sgd = ["--optim", "sgd", "--learning_rate", "0.1"]
    model_dir = model.build(tmp_path / "model")

    def train(name, config):
        env = dict(VIDEO_ENV)
        plugins = []
        if config is not None:
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config))
            env["VLM_DPO_CONFIG"] = str(path)
            plugins = ["--external_plugins", plugin_file]
        run = swift_dpo(
            model, max_steps=3, extra_args=[*sgd, *plugins], output_name=name, env_extra=env,
            dataset=video_dataset, model_dir=model_dir,
        )  # fmt: skip
        assert run.returncode == 0, run.tail()
        assert len(run.logged_steps()) == 3, run.tail()
        return run

    stock = train("stock", None)
    # Swift's printed example: the prompt holds a run of <|video_pad|> (id 151656) tokens.
    assert "<|vision_start|>[151656 * " in stock.stdout + stock.stderr, stock.tail()
    loss = {"loss": {"type": "sigmoid"}}
    unshared = train("unshared", {**loss, "sharing": UNSHARED})
    shared = train("shared", loss)
    assert PACKED_LINE in shared.stdout + shared.stderr, shared.tail()
    for mine, theirs in zip(unshared.logged_steps(), stock.logged_steps(), strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (key, mine, theirs)
    assert_logits_as_swift_logs_them(unshared, stock)
    for mine, theirs in zip(shared.logged_steps(), unshared.logged_steps(), strict=True):
        assert mine["collation/warned_rows"] == mine["collation/skipped_rows"] == 0, mine
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (key, mine, theirs)
