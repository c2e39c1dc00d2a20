"""A Qwen2-VL-style model (windowless ViT, patch merger, M-RoPE Qwen2) small enough to train on a CPU in seconds."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from vlm_dpo_plugins.tiny.data import tokenizer_corpus
from vlm_dpo_plugins.tiny.tokenizer import train_byte_level_bpe, wrap_for_transformers

# The real Qwen2 ids: ms-swift's ``qwen2_vl`` template hard-codes them, and the
# Qwen2VLConfig defaults (image_token_id=151655, ...) then need no overriding.
QWEN_SPECIAL_TOKEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
IMAGE_TOKEN = "<|image_pad|>"
PATCH_SIZE = 14
MERGE_SIZE = 2
# A 56x56 image is 4x4 patches, merged 2x2 into 4 tokens; the cap keeps any image at 16 tokens or fewer.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112

# Qwen2-VL-Instruct's ChatML: a default system turn, one vision block per image/video item.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer():
    """Qwen2's byte-level BPE with the special tokens at their real ids (Qwen2-VL and Qwen2.5-VL share it)."""
    special_tokens = list(QWEN_SPECIAL_TOKEN_IDS)
    return wrap_for_transformers(
        train_byte_level_bpe(tokenizer_corpus(), special_tokens, pinned_ids=QWEN_SPECIAL_TOKEN_IDS),
        bos_token=None,  # Qwen has no BOS; the chat template starts with <|im_start|>
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        extra_special_tokens=special_tokens[1:],
    )


def qwen_vision_processors(image_pixels: int | None) -> dict:
    """The image and video processors of Qwen2-VL and Qwen2.5-VL (the same classes and patching)."""
    pixels = {"min_pixels": image_pixels or MIN_PIXELS, "max_pixels": image_pixels or MAX_PIXELS}
    return {
        "image_processor": Qwen2VLImageProcessor(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, **pixels),
        "video_processor": Qwen2VLVideoProcessor(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, **pixels),
    }


def mrope_section(head_dim: int) -> list[int]:
    # Temporal/height/width split of the rotary half-dim, in Qwen's 16:24:24 proportions; must sum to head_dim / 2.
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def build_tiny_qwen2_vl(
    directory: str | Path, *, seed: int = 0, hidden_size: int = 32, image_pixels: int | None = None, layers: int = 2
) -> Path:
    """Save a random-weight tiny Qwen2-VL with its processor to ``directory`` and return the path.

    The vocabulary is ~151k rows because the special tokens sit at their real ids;
    at ``hidden_size=32`` the embedding and LM head are ~20 MB each. ``image_pixels``: every
    image resized to that many pixels, e.g. 448 * 448 for 256 merged image tokens.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen_tokenizer()
    processor = Qwen2VLProcessor(**qwen_vision_processors(image_pixels), tokenizer=tokenizer,
                                 chat_template=QWEN2_VL_CHAT_TEMPLATE)  # fmt: skip
    num_heads = 2
    config = Qwen2VLConfig(
        vision_config={
            "depth": layers,
            "embed_dim": hidden_size,
            "num_heads": num_heads,
            "mlp_ratio": 2,
            "hidden_size": hidden_size,  # the merger's output width, so it must equal the text width
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
        },
        text_config=qwen_text_config(tokenizer, hidden_size, layers, num_heads, num_key_value_heads=num_heads),
        # Untied like Qwen2-VL-7B: a tied head is saved once, and versions disagree on where the flag lives.
        tie_word_embeddings=False,
    )
    return save_qwen_model(Qwen2VLForConditionalGeneration, config, tokenizer, processor, directory, seed)


def qwen_text_config(tokenizer, hidden_size: int, layers: int, num_heads: int, *, num_key_value_heads: int) -> dict:
    """The language model of Qwen2-VL and Qwen2.5-VL at tiny width: Qwen2 with M-RoPE, the real special ids."""
    return {
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_key_value_heads,
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
    }


def save_qwen_model(model_class, config, tokenizer, processor, directory: Path, seed: int) -> Path:
    """Random weights from ``seed``, Qwen's generation ids, saved with the processor like a hub checkpoint."""
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
