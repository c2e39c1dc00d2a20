"""A Qwen2.5-VL-style model small enough to train on a CPU in seconds.

What Qwen2.5-VL changes against Qwen2-VL, kept at tiny size: a window-attention ViT with full-attention blocks
at given depths (``window_size``, ``fullatt_block_indexes``), RMSNorm and SwiGLU in the ViT, a merger whose output
width (``out_hidden_size``) differs from the ViT's, grouped-query attention in the language model, and M-RoPE with
time scaled by ``tokens_per_second``. Tokenizer, chat template and processors are Qwen2-VL's.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from vlm_dpo_plugins.tiny.qwen2_vl import (
    PATCH_SIZE,
    QWEN2_VL_CHAT_TEMPLATE,
    qwen_text_config,
    qwen_tokenizer,
    qwen_vision_processors,
    save_qwen_model,
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
        # grouped-query attention, as in every Qwen2.5-VL size
        text_config=qwen_text_config(tokenizer, hidden_size, layers, num_heads, num_key_value_heads=num_heads // 2),
        tie_word_embeddings=False,
    )
    return save_qwen_model(Qwen2_5_VLForConditionalGeneration, config, tokenizer, processor, directory, seed)
