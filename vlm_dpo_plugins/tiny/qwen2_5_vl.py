"""A Qwen2.5-VL-style model small enough to train on a CPU in seconds.

What Qwen2.5-VL changes against Qwen2-VL, kept at tiny size: a window-attention ViT with full-attention blocks
at given depths (``window_size``, ``fullatt_block_indexes``), RMSNorm and SwiGLU in the ViT, a merger whose output
width (``out_hidden_size``) differs from the ViT's, grouped-query attention in the language model, and M-RoPE with
time scaled by ``tokens_per_second``. Tokenizer, chat template and processors are Qwen2-VL's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from vlm_dpo_plugins.tiny.qwen2_vl import (
    PATCH_SIZE,
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKEN_IDS,
    mrope_section,
    qwen_tokenizer,
    qwen_vision_processors,
)


def build_tiny_qwen2_5_vl(
    directory: str | Path, *, seed: int = 0, hidden_size: int = 32, image_pixels: int | None = None, layers: int = 2
) -> Path:
    """Save a random-weight tiny Qwen2.5-VL with its processor to ``directory`` and return the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen_tokenizer()
    processor = Qwen2_5_VLProcessor(**qwen_vision_processors(image_pixels), tokenizer=tokenizer,
                                    chat_template=QWEN2_VL_CHAT_TEMPLATE)  # fmt: skip
    num_heads, vision_width = 4, 2 * hidden_size
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": layers,
            "hidden_size": vision_width,
            "intermediate_size": vision_width * 2,
            "num_heads": num_heads,
            "out_hidden_size": hidden_size,  # the merger's output: the language model's width
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            # Windows of 2x2 merged tokens; the last block attends over the whole image, as Qwen2.5-VL's do.
            "window_size": 2 * 2 * PATCH_SIZE,
            "fullatt_block_indexes": [layers - 1],
        },
        text_config={
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_heads // 2,  # grouped-query attention, as in every Qwen2.5-VL size
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 1024,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": mrope_section(hidden_size // num_heads),
            },
            "bos_token_id": QWEN_SPECIAL_TOKEN_IDS["<|endoftext|>"],
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
