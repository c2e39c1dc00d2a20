"""A saved model's tensors under the live parameter names, whichever layout its folder holds.

The tiny models are saved in the hub layout (``visual.*``, ``model.layers.*``); the plugins write checkpoints in the
live one (``model.visual.*``, ``model.language_model.layers.*``), the one the Trainer's resume reads back under
transformers 5. Loading through ``from_pretrained`` names both alike, so a test compares them tensor by tensor.
"""

from __future__ import annotations

from pathlib import Path


def live_weights(directory: Path) -> dict:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(directory, dtype="float32")
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def without_adapters(weights: dict) -> dict:
    """A PEFT model's state dict as the base model's: LoRA tensors left out, PEFT's names back to the model's own
    (``base_model.model.`` dropped, a wrapped layer's ``base_layer`` weights as the layer's)."""
    return {
        name.removeprefix("base_model.model.").replace(".base_layer.", "."): tensor
        for name, tensor in weights.items()
        if ".lora_" not in name
    }


ADAM_ROUNDING = 1e-6
"""How far a sharded run's weights may end from the same run's under DDP, in absolute terms. The shards' gradients are
summed in another order than DDP's all-reduce, and AdamW divides each element by the root of its running square: an
element near zero moves its weight by a fraction of the learning rate (1e-3 in these runs) rather than by rounding.
A thousandth of it (seen: up to 5e-7); a weight stepped wrongly moves by about a whole learning rate."""


def assert_same_weights(actual: dict, expected: dict, tolerance: float = ADAM_ROUNDING, label: str = "") -> None:
    """The same tensor names, and each tensor within ``tolerance`` of the expected one, element by element."""
    assert actual.keys() == expected.keys(), (label, sorted(actual.keys() ^ expected.keys())[:10])
    for name, tensor in expected.items():
        difference = (actual[name] - tensor).abs().max().item()
        assert difference <= tolerance, (label, name, difference)
