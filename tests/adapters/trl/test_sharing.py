"""Prompt and image sharing inside VLMDPOTrainer: the same loss, rewards and gradients, with fewer vision encodes.

Each check runs the plugins' loss on one batch twice, ``sharing`` on and off, in fp32 (no autocast: TRL
prepares the reference model with autocast at construction but the policy only in ``train()``, so a
single ``compute_loss`` outside ``train()`` would compare bf16 with fp32).
"""

from __future__ import annotations

import copy
import logging

import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl_runs import (  # noqa: E402
    plain_rows,
    COUNTED_IN_CROPS,
    COUNTED_IN_ROWS,
    EVERYTHING_TRAINS,
    TRL_FAMILIES,
    count_images,
    make_trainer,
    snapshot,
    training_logs,
)

NO_SHARING = {"prompt": False, "vision_features": False}
FROZEN = {}


@pytest.fixture(scope="module")
def uneven_rows(preference_rows):
    """Pairs whose prompts, responses and images differ in size, so packed rows and collated rows both pad and the
    families that tile or resize by shape (LLaVA-NeXT, Idefics3, Qwen-VL) give each image its own token count."""
    rows = copy.deepcopy(preference_rows[:4])
    rows[1]["rejected"][0]["content"][0]["text"] += " I am quite sure, it is that colour and no other."
    rows[2]["chosen"][0]["content"][0]["text"] += " Yes."
    rows[3]["prompt"][0]["content"][1]["text"] += " Answer in one short sentence, please."
    for row, size in zip(rows[1:], [(56, 28), (28, 56), (84, 56)]):
        row["images"] = [image.resize(size) for image in row["images"]]
    return rows


class VisionCalls:
    """Images through each model's vision tower, by the tower's forward pre-hook."""

    def __init__(self, trainer):
        self.images = {"policy": 0, "reference": 0}
        models = {"policy": trainer.model, "reference": trainer.ref_model}
        for role, model in models.items():
            if model is not None:
                count_images(model, self._counter(role))

    def _counter(self, role):
        def add(images):
            self.images[role] += images

        return add


def one_step(model_dir, rows, tmp_path, sharing, freeze, **overrides):
    config = {**freeze, "sharing": sharing}
    trainer = make_trainer(
        model_dir, rows, tmp_path, vlm_dpo_config=config, per_device_train_batch_size=4, bf16=False, **overrides
    )
    batch = next(iter(trainer.get_train_dataloader()))
    calls = VisionCalls(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items() if values}
    return loss.detach(), gradients, metrics, calls.images


def assert_same_step(shared, unshared, tolerance=1e-5):
    loss, gradients, metrics, _ = shared
    loss_ref, gradients_ref, metrics_ref, _ = unshared
    assert torch.allclose(loss, loss_ref, atol=tolerance, rtol=0)
    assert gradients.keys() == gradients_ref.keys() and gradients
    for name, gradient in gradients.items():
        assert torch.allclose(gradient, gradients_ref[name], atol=tolerance, rtol=0), name
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[name] == pytest.approx(metrics_ref[name], abs=tolerance), name
    for name in ("logps/chosen", "logps/rejected"):
        # Sums of ~50 token log-probs near -170: equal to fp32 rounding, relative.
        assert metrics[name] == pytest.approx(metrics_ref[name], rel=1e-6), name
    # Before the first update the policy is the reference: every reward is fp32 rounding (|r| within the tolerance)
    # and its sign, which the accuracy counts, is the kernels' choice (0.0 against 0.25 for LLaVA-OneVision on an
    # AVX-512 machine). Where the rewards are more than rounding, the accuracies must agree exactly.
    if max(abs(metrics_ref[name]) for name in ("rewards/chosen", "rewards/rejected")) > tolerance:
        assert metrics["rewards/accuracies"] == metrics_ref["rewards/accuracies"]


@pytest.mark.model_support("TRL", "sharing")
@pytest.mark.parametrize("model", TRL_FAMILIES)
@pytest.mark.parametrize(
    ("freeze", "encodes_per_pair"), [(FROZEN, 1), (EVERYTHING_TRAINS, 2)], ids=["frozen", "trained"]
)
def test_shared_step_equals_the_unshared_one(tiny_model_dirs, uneven_rows, tmp_path, model, freeze, encodes_per_pair):
    shared = one_step(tiny_model_dirs[model], uneven_rows, tmp_path / "on", {}, freeze)
    unshared = one_step(tiny_model_dirs[model], uneven_rows, tmp_path / "off", NO_SHARING, freeze)
    assert_same_step(shared, unshared)
    # Every pair's image, once: 4 images, or InternVL's crops (its encoder takes crops with no count per image).
    once = unshared[3]["policy"] // 2
    assert once == 4 or model in COUNTED_IN_CROPS
    assert unshared[3] == {"policy": 2 * once, "reference": 2 * once}
    # Frozen: the reference takes the policy's features; trained: it encodes its own, once per pair.
    assert shared[3] == {"policy": once, "reference": once * (encodes_per_pair - 1)}
    assert shared[2]["num_tokens"] == unshared[2]["num_tokens"]


@pytest.fixture(scope="module")
def two_image_rows(uneven_rows):
    """The uneven pairs with a second image in each prompt (the next pair's, so the two differ)."""
    rows = copy.deepcopy(uneven_rows)
    for index, row in enumerate(rows):
        row["images"] = [*row["images"], uneven_rows[(index + 1) % len(rows)]["images"][0]]
        row["prompt"][0]["content"].insert(1, {"type": "image"})
    return rows


@pytest.mark.model_support("TRL", "multi-image")
@pytest.mark.parametrize("model", TRL_FAMILIES)
def test_two_images_per_prompt_share_like_one(tiny_model_dirs, two_image_rows, tmp_path, model):
    shared = one_step(tiny_model_dirs[model], two_image_rows, tmp_path / "on", {}, FROZEN)
    unshared = one_step(tiny_model_dirs[model], two_image_rows, tmp_path / "off", NO_SHARING, FROZEN)
    assert_same_step(shared, unshared)
    once = unshared[3]["policy"] // 2
    assert once == (4 if model in COUNTED_IN_ROWS else 8) or model in COUNTED_IN_CROPS  # each image encoded once
    assert shared[3] == {"policy": once, "reference": 0}


@pytest.mark.model_support("TRL", "sharing", family="paligemma")
def test_paligemma_prefix_attends_both_ways_packed_as_in_two_rows(tiny_model_dirs, uneven_rows, tmp_path, caplog):
    # A prefix LM: image tokens, BOS, prompt and newline attend to each other both ways, the responses causally.
    rows = plain_rows(uneven_rows)
    with caplog.at_level(logging.INFO, logger="vlm_dpo_plugins.sharing"):
        shared = one_step(tiny_model_dirs["paligemma"], rows, tmp_path / "on", {}, FROZEN)
    unshared = one_step(tiny_model_dirs["paligemma"], rows, tmp_path / "off", NO_SHARING, FROZEN)
    assert "attend to each other both ways in training" in caplog.text
    assert "each pair runs as one row" in caplog.text
    assert_same_step(shared, unshared)
    assert shared[3] == {"policy": 4, "reference": 0} and unshared[3] == {"policy": 8, "reference": 8}


def test_lora_reference_reuses_the_features_of_the_same_model(tiny_model_dirs, uneven_rows, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    shared = one_step(tiny_model_dirs["llava"], uneven_rows, tmp_path / "on", {}, FROZEN, peft_config=lora)
    unshared = one_step(tiny_model_dirs["llava"], uneven_rows, tmp_path / "off", NO_SHARING, FROZEN, peft_config=lora)
    assert_same_step(shared, unshared)
    assert shared[3] == {"policy": 4, "reference": 0}


def test_eager_attention_takes_the_additive_mask(tiny_model_dirs, uneven_rows, tmp_path):
    eager = {"attn_implementation": "eager"}
    shared = one_step(tiny_model_dirs["qwen2_vl"], uneven_rows, tmp_path / "on", {}, FROZEN, model_kwargs=eager)
    unshared = one_step(
        tiny_model_dirs["qwen2_vl"], uneven_rows, tmp_path / "off", NO_SHARING, FROZEN, model_kwargs=eager
    )
    assert_same_step(shared, unshared)


def test_with_the_dense_mask_an_attention_that_cannot_take_it_runs_two_rows_and_says_so_once(
    tiny_model_dirs, uneven_rows, tmp_path, monkeypatch, caplog
):
    from vlm_dpo_plugins.sharing import forward

    monkeypatch.setattr(forward, "MASKABLE_ATTENTION", {"eager": "float"})
    with caplog.at_level(logging.WARNING, logger="vlm_dpo_plugins.sharing"):
        shared = one_step(tiny_model_dirs["llava"], uneven_rows, tmp_path / "on", {"attention": "dense"}, FROZEN)
    unshared = one_step(tiny_model_dirs["llava"], uneven_rows, tmp_path / "off", NO_SHARING, FROZEN)
    assert_same_step(shared, unshared)
    notices = [r.getMessage() for r in caplog.records if "sharing.prompt" in r.getMessage()]
    assert notices == [
        "vlm-dpo: sharing.prompt: attention implementation 'sdpa' cannot take the mask that keeps a pair's two "
        "responses apart; chosen and rejected run as two rows each (eager or sdpa can share the prompt)"
    ]
    # Still one encode per pair: the rejected rows' repeated images are not encoded again.
    assert shared[3] == {"policy": 4, "reference": 0}


def test_training_with_sharing_follows_the_unshared_run(tiny_model_dirs, uneven_rows, tmp_path):
    runs = {}
    for name, sharing in (("on", {}), ("off", NO_SHARING)):
        # SGD: AdamW's m / sqrt(v) turns a 1e-9 gradient's rounding into a step of the full learning rate.
        trainer = make_trainer(
            tiny_model_dirs["llava"],
            uneven_rows * 2,
            tmp_path / name,
            vlm_dpo_config={"sharing": sharing},
            bf16=False,
            optim="sgd",
            learning_rate=0.5,
        )
        trainer.train()
        runs[name] = (training_logs(trainer), snapshot(trainer.model))
    (logs, parameters), (logs_ref, parameters_ref) = runs["on"], runs["off"]
    assert len(logs) == len(logs_ref) == 4
    for entry, entry_ref in zip(logs, logs_ref):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert entry[key] == pytest.approx(entry_ref[key], abs=1e-5), key
    for name, value in parameters.items():
        assert torch.allclose(value, parameters_ref[name], atol=1e-5, rtol=0), name


class DenseMasks(TorchFunctionMode):
    """Every ``[B, 1, T, T]`` or ``[B, T, T]`` tensor (B pairs) built while the mode is on: a dense attention mask."""

    def __init__(self, pairs):
        super().__init__()
        self.pairs, self.found = pairs, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.ndim in (3, 4) and out.shape[0] == self.pairs:
            if out.shape[-1] == out.shape[-2] > 1 and (out.ndim == 3 or out.shape[1] == 1):
                self.found.append((tuple(out.shape), str(func)))
        return out


@pytest.mark.parametrize("model", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_with_sdpa_packed_rows_attend_without_a_dense_mask(tiny_model_dirs, uneven_rows, tmp_path, monkeypatch, model):
    from vlm_dpo_plugins.sharing import forward

    layouts = []
    monkeypatch.setattr(forward.PairLayout, "of", record(forward.PairLayout.of, layouts))
    with DenseMasks(pairs=4) as probe:
        shared = one_step(tiny_model_dirs[model], uneven_rows, tmp_path / "on", {}, FROZEN)
    assert probe.found == []
    # Policy and reference: every decoder layer's attention computed from the layout (the tiny models have 2).
    assert [layout.dispatched for layout in layouts] == [4]
    dense = one_step(tiny_model_dirs[model], uneven_rows, tmp_path / "dense", {"attention": "dense"}, FROZEN)
    unshared = one_step(tiny_model_dirs[model], uneven_rows, tmp_path / "off", NO_SHARING, FROZEN)
    assert_same_step(shared, unshared)
    assert_same_step(shared, dense)


@pytest.mark.parametrize("model", ["llava", "qwen2_vl"])
def test_with_flash_attention_2_packed_rows_attend_through_the_interface(
    tiny_model_dirs, uneven_rows, tmp_path, monkeypatch, model
):
    """A language model configured for ``flash_attention_2`` packs as under sdpa: every decoder call is computed from
    the layout, no dense mask is built, and the step equals two rows. flash-attn is not installed here (no CUDA):
    the configuration is set after loading, so any call the layout did not serve would fail on its import."""
    from transformers import AutoModelForImageTextToText

    import trl_runs
    from vlm_dpo_plugins.sharing import forward

    class LoadedForFlashAttention:
        @staticmethod
        def from_pretrained(path, **kwargs):
            loaded = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
            loaded.config.get_text_config()._attn_implementation = "flash_attention_2"
            return loaded

    layouts = []
    monkeypatch.setattr(forward.PairLayout, "of", record(forward.PairLayout.of, layouts))
    monkeypatch.setattr(trl_runs, "AutoModelForImageTextToText", LoadedForFlashAttention)
    with DenseMasks(pairs=4) as probe:
        shared = one_step(tiny_model_dirs[model], uneven_rows, tmp_path / "on", {}, FROZEN)
    monkeypatch.undo()
    assert probe.found == []
    assert [layout.dispatched for layout in layouts] == [4]
    unshared = one_step(tiny_model_dirs[model], uneven_rows, tmp_path / "off", NO_SHARING, FROZEN)
    assert_same_step(shared, unshared)


def record(build, built):
    def of(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    return of


def test_a_model_that_does_not_pass_the_layout_down_falls_back_to_the_mask_once(
    tiny_model_dirs, uneven_rows, tmp_path, caplog
):
    from vlm_dpo_plugins.sharing.prefix_attention import LAYOUT_KEYWORD

    trainer = make_trainer(
        tiny_model_dirs["llava"], uneven_rows, tmp_path / "on", vlm_dpo_config={}, per_device_train_batch_size=4,
        bf16=False,
    )  # fmt: skip
    model_forward = trainer.model.forward

    def forward_dropping_keywords(*args, **kwargs):  # a model whose forward keeps its keyword arguments to itself
        kwargs.pop(LAYOUT_KEYWORD, None)
        return model_forward(*args, **kwargs)

    trainer.model.forward = forward_dropping_keywords
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with caplog.at_level(logging.WARNING, logger="vlm_dpo_plugins.sharing"):
        loss = trainer.compute_loss(trainer.model, batch)
        trainer.compute_loss(trainer.model, batch)
    notices = [r.getMessage() for r in caplog.records if "sharing.attention" in r.getMessage()]
    assert notices == [
        "vlm-dpo: sharing.attention: this model does not pass its keyword arguments down to its sdpa attention, so a "
        "packed row's responses cannot be kept apart without a mask; from now on with a dense 4D mask"
    ]
    unshared = one_step(tiny_model_dirs["llava"], uneven_rows, tmp_path / "off", NO_SHARING, FROZEN)
    assert torch.allclose(loss.detach(), unshared[0], atol=1e-5, rtol=0)


def windowed(model_dir, tmp_path, window):
    """The tiny Qwen2-VL with its second layer attending through a sliding window of ``window`` tokens."""
    import json
    import shutil

    folder = tmp_path / f"window-{window}"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    text = config.setdefault("text_config", {})
    text.update(use_sliding_window=True, sliding_window=window, max_window_layers=1)
    text["layer_types"] = ["full_attention", "sliding_attention"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("window", "packed"), [(4096, True), (40, False)], ids=["pairs-within", "pairs-longer"])
def test_a_sliding_window_model_packs_only_pairs_within_its_window(
    tiny_model_dirs, uneven_rows, tmp_path, caplog, window, packed
):
    # Packed, the rejected branch sits further along the row than in its own: a windowed layer would see other keys
    # unless every branch, prompt included, fits the window. Longer pairs run as two rows, said once.
    model_dir = windowed(tiny_model_dirs["qwen2_vl"], tmp_path, window)
    with caplog.at_level(logging.INFO, logger="vlm_dpo_plugins.sharing"):
        shared = one_step(model_dir, uneven_rows, tmp_path / "on", {}, FROZEN)
    unshared = one_step(model_dir, uneven_rows, tmp_path / "off", NO_SHARING, FROZEN)
    assert_same_step(shared, unshared)
    messages = [r.getMessage() for r in caplog.records]
    assert any("each pair runs as one row" in m for m in messages) == packed
    longer = [m for m in messages if "longer than the model's sliding window (40)" in m]
    assert len(longer) == (0 if packed else 1), messages
