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
