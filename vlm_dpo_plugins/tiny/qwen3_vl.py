"""A Qwen3-VL-style model small enough to train on a CPU in seconds.

What Qwen3-VL changes against Qwen2.5-VL, kept at tiny size: 16-pixel patches with learned position embeddings
interpolated per image, DeepStack (``deepstack_visual_indexes``: features of earlier ViT blocks merged and added
to the first language layers' hidden states at the image positions), interleaved M-RoPE, and a Qwen3 language
model (per-head q/k norms, explicit ``head_dim``). The tokenizer and special ids are Qwen's.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from vlm_dpo_plugins.tiny.qwen2_vl import (
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKEN_IDS,
    qwen_tokenizer,
    save_qwen_model,
)

PATCH_SIZE = 16
MERGE_SIZE = 2
# A 64x64 image is 4x4 patches, merged 2x2 into 4 tokens; the cap keeps any image at 16 tokens or fewer.
MIN_PIXELS = 64 * 64
MAX_PIXELS = 128 * 128


def build_tiny_qwen3_vl(directory: str | Path, *, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """Save a random-weight tiny Qwen3-VL with its processor to ``directory`` and return the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen_tokenizer()
    pixels = {"patch_size": PATCH_SIZE, "merge_size": MERGE_SIZE, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen3VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    num_heads, head_dim = 2, 16
    config = Qwen3VLConfig(
        vision_config={
            "depth": layers + 1,
            "hidden_size": 2 * hidden_size,
            "intermediate_size": 4 * hidden_size,
            "num_heads": num_heads,
            "out_hidden_size": hidden_size,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,  # an 8x8 grid, interpolated to each image's patch grid
            # One DeepStack merger per early block, as the released models take blocks 8, 16, 24 of 27.
            "deepstack_visual_indexes": list(range(layers)),
        },
        text_config={
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": 1,
            "head_dim": head_dim,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 1024,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [2, 3, 3],  # head_dim / 2 = 8, in the 24:20:20 spirit of the released split
                "mrope_interleaved": True,
            },
            "bos_token_id": QWEN_SPECIAL_TOKEN_IDS["<|endoftext|>"],
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        tie_word_embeddings=False,
    )
    return save_qwen_model(Qwen3VLForConditionalGeneration, config, tokenizer, processor, directory, seed)
