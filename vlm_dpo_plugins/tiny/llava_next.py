"""LLaVA-NeXT-style models (LLaVA-1.5's tower, projector and Llama, plus "anyres" tiling) small enough to train on
a CPU in seconds.

Anyres, kept at tiny sizes: each image is resized to the best-fitting resolution of ``image_grid_pinpoints``,
cut into encoder-sized tiles and encoded with a downscaled whole view; the features of the tiles are stitched
back, unpadded to the image's aspect ratio and closed row by row with a learned ``image_newline``. So the number
of ``<image>`` tokens depends on each image's shape, and a batch mixes images of different token counts.
The tokenizer and conversation format are the tiny LLaVA's.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
)

from vlm_dpo_plugins.tiny.llava import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, PATCH_SIZE, llava_tokenizer
from vlm_dpo_plugins.tiny.saving import save_with_tokenizer_ids

TILE_SIZE = 28
"""The encoder's input: (28 / 14)^2 = 4 patch tokens per tile (LLaVA-NeXT: 336 px, 576)."""
GRID_PINPOINTS = [[28, 56], [56, 28], [56, 56]]
"""The resolutions an image may be tiled at: 1 × 2, 2 × 1 or 2 × 2 tiles."""


def build_tiny_llava_next(directory: str | Path, *, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """Save a random-weight tiny LLaVA-NeXT with its processor to ``directory`` and return the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = llava_tokenizer()
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": TILE_SIZE},
            crop_size={"height": TILE_SIZE, "width": TILE_SIZE},
            image_grid_pinpoints=GRID_PINPOINTS,
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=TILE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=hidden_size,
        ),
        text_config=LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(TILE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return save_with_tokenizer_ids(LlavaNextForConditionalGeneration, config, tokenizer, processor, directory, seed)
