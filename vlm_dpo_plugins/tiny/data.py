"""Synthetic image-preference data: a shape of some colour, a question, a right and a wrong answer."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
}
SHAPES = ("square", "circle", "triangle")
QUESTIONS = (
    "What color is the {shape}?",
    "Which color does the {shape} have?",
    "Describe the color of the {shape} in the image.",
)
IMAGE_SIZE = 56  # 56x56 gives 4 merged tokens for Qwen2-VL at min_pixels=3136; LLaVA resizes it


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair about one image: ``chosen`` names the right colour, ``rejected`` a wrong one."""

    prompt: str
    chosen: str
    rejected: str
    image: Image.Image
    image_name: str


def draw_shape(shape: str, colour: tuple[int, int, int], size: int = IMAGE_SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    margin = size // 6
    box = (margin, margin, size - margin, size - margin)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(size // 2, margin), (size - margin, size - margin), (margin, size - margin)], fill=colour)
    return image


def make_preference_examples(count: int, seed: int = 0) -> list[PreferenceExample]:
    """Build ``count`` distinct-enough pairs deterministically from ``seed``."""
    rng = random.Random(seed)
    names = sorted(COLOURS)
    examples = []
    for index in range(count):
        shape = rng.choice(SHAPES)
        right, wrong = rng.sample(names, 2)
        examples.append(
            PreferenceExample(
                prompt=rng.choice(QUESTIONS).format(shape=shape),
                chosen=f"The {shape} is {right}.",
                rejected=f"The {shape} is {wrong}.",
                image=draw_shape(shape, COLOURS[right]),
                image_name=f"pair_{index:04d}_{shape}_{right}.png",
            )
        )
    return examples


def trl_conversational_rows(examples: list[PreferenceExample]) -> list[dict]:
    """The examples in TRL's conversational vision-preference format (``images`` + message lists)."""
    return [
        {
            "images": [example.image],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example.prompt}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": example.chosen}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": example.rejected}]}],
        }
        for example in examples
    ]


def write_preference_images(examples: list[PreferenceExample], directory: str | Path) -> list[Path]:
    """Save each example's image as PNG under ``directory``; returns the paths in example order."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for example in examples:
        path = directory / example.image_name
        example.image.save(path)
        paths.append(path)
    return paths


def tokenizer_corpus() -> list[str]:
    """Every sentence the synthetic data can produce, so the tiny BPE covers it in few tokens."""
    lines = []
    for shape in SHAPES:
        for question in QUESTIONS:
            lines.append(question.format(shape=shape))
        for colour in COLOURS:
            lines.append(f"The {shape} is {colour}.")
    lines += ["USER:", "ASSISTANT:", "system", "user", "assistant", "You are a helpful assistant."]
    # LLaMA-Factory's llava/vicuna default system prompt; without it each row costs ~100 byte tokens.
    lines.append(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    return lines
