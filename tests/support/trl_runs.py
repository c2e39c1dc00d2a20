"""Shared pieces of the TRL adapter's end-to-end tests: a trainer on a tiny VLM, snapshots, a gradient fault."""

from __future__ import annotations

import copy
import math

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
from vlm_dpo_plugins.adapters.trl import VLMDPOTrainer

TRL_FAMILIES = [
    "llava", "qwen2_vl", "qwen2_5_vl", "gemma3", "qwen3_vl", "idefics3", "llava_next", "llava_onevision", "mistral3",
    "internvl", "mllama",
]  # fmt: skip
"""The tiny families (``tiny_model_dirs``) every TRL family test runs on."""
STOCK_CANNOT_TRAIN = {"mllama"}
"""Families stock ``trl.DPOTrainer`` fails on (``test_trainer.py`` shows how, and the adapter training them)."""
COUNTED_IN_CROPS = {"internvl"}
"""Families whose ``get_image_features`` takes a flat batch of crops with no count per image: ``count_images``
counts their crops."""
COUNTED_IN_ROWS = {"idefics3", "mllama"}
"""Families whose image encoder takes ``[rows, images or crops, ...]``: ``count_images`` counts rows,
which is images only with one image per row."""
EVERYTHING_TRAINS = {"freeze": {"trainable": ["vision", "projector", "language"]}}
UNSHARED = {"sharing": {"prompt": False, "vision_features": False}}
"""Two rows per pair, as stock TRL runs them: for comparisons with TRL to 1e-5 over several AdamW steps, which
the packed rows' different rounding (1e-7 per step, test_sharing.py) would exceed once AdamW divides tiny
gradients by their own size."""


def make_trainer(model_dir, rows, output_dir, *, trainer_class=VLMDPOTrainer, callbacks=(), **overrides):
    plugin_config = overrides.pop("vlm_dpo_config", None)
    model_kwargs = overrides.pop("model_kwargs", {})
    peft_config = overrides.pop("peft_config", None)
    plugin_manager = overrides.pop("plugin_manager", None)
    torch.manual_seed(0)
    options = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    options.update(overrides)
    kwargs = dict(
        model=AutoModelForImageTextToText.from_pretrained(model_dir, **model_kwargs),
        args=trl.DPOConfig(**options),
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoProcessor.from_pretrained(model_dir),
        callbacks=list(callbacks),
    )
    if peft_config is not None:
        kwargs["peft_config"] = peft_config
    if trainer_class is VLMDPOTrainer:
        kwargs["vlm_dpo_config"] = plugin_config
        kwargs["plugin_manager"] = plugin_manager
    return trainer_class(**kwargs)


def training_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def inner_model(model):
    """The VLM's ``model`` (vision tower, projector, language model) under any PEFT wrapper."""
    return model.get_base_model().model if hasattr(model, "get_base_model") else model.model


def language_model_of(model):
    """The VLM's language model (Idefics3 names it ``text_model``)."""
    inner = inner_model(model)
    return getattr(inner, "language_model", None) or inner.text_model


def count_images(model, on_images) -> None:
    """``on_images(n)`` with the number of images each encode of the model's images covers.

    Counted where the language model asks for image features (``get_image_features``, which runs the vision
    tower and projector): the vision tower itself sees Idefics3's crops, not images. The plugins' sharing wraps
    the same method on top of this counter, so features handed out again are not counted.
    """
    inner = inner_model(model)
    # Mllama has no get_image_features: its forward calls the vision model directly.
    owner, method = (inner, "get_image_features")
    if not hasattr(inner, "get_image_features"):
        owner, method = inner.vision_model, "forward"
    encode = getattr(owner, method)

    def counted(*args, **kwargs):
        grid = kwargs.get("image_grid_thw", args[1] if len(args) > 1 else None)  # Qwen-VL: one row per image
        pixels = args[0] if args else kwargs["pixel_values"]
        # Idefics3, Mllama: [rows, crops or images, ...] with one image per row in these tests.
        on_images(int(grid.shape[0] if isinstance(grid, torch.Tensor) and grid.ndim == 2 else pixels.shape[0]))
        return encode(*args, **kwargs)

    setattr(owner, method, counted)


def changed(model, before) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}


class InjectNonFiniteGradient(TrainerCallback):
    """Puts NaN into one gradient just before the optimizer step of ``at_steps``, and records what the step did."""

    def __init__(self, at_steps, parameter="model.language_model.layers.0.mlp.up_proj.weight"):
        self.at_steps = set(at_steps)
        self.parameter = parameter
        self.records = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step in self.at_steps:
            dict(model.named_parameters())[self.parameter].grad.view(-1)[0] = math.nan
            self.records[state.global_step] = {
                "parameters": snapshot(model),
                "optimizer": copy.deepcopy(optimizer.state_dict()),
                "schedule": lr_scheduler.last_epoch,
            }

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        step = state.global_step - 1
        if step in self.records:
            self.records[step].update(
                after_parameters=snapshot(model),
                after_optimizer=copy.deepcopy(optimizer.state_dict()),
                after_schedule=lr_scheduler.last_epoch,
            )


def identical_pair_rows(rows, indices):
    broken = copy.deepcopy(rows)
    for index in indices:
        broken[index]["rejected"] = copy.deepcopy(broken[index]["chosen"])
    return broken


def plain_rows(conversational_rows):
    """The rows as plain text (prompt, chosen, rejected strings and the images), as a model without a chat template
    (PaliGemma) trains on them."""

    def text(messages):
        return "".join(item["text"] for message in messages for item in message["content"] if item["type"] == "text")

    return [
        {"prompt": text(row["prompt"]), "chosen": text(row["chosen"]), "rejected": text(row["rejected"]),
         "images": row["images"]}
        for row in conversational_rows
    ]  # fmt: skip
