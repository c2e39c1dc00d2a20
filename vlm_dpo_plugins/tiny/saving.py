"""The last step every tiny builder shares: random weights from a seed, saved like a hub checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def save_with_tokenizer_ids(model_class: Any, config: Any, tokenizer: Any, processor: Any, directory: Path,
                            seed: int) -> Path:  # fmt: skip
    """``model_class(config)`` from ``seed``, its generation ids the tokenizer's, saved with ``processor``."""
    torch.manual_seed(seed)
    model = model_class(config)
    # Frameworks compare these with the tokenizer's and rewrite the config, with a warning, when they differ.
    generation = model.generation_config
    generation.pad_token_id, generation.bos_token_id, generation.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
