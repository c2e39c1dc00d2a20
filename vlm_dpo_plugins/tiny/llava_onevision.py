"""A LLaVA-OneVision-style model (SigLIP tower, MLP projector, Qwen2 in ChatML) small enough to train on a CPU in
seconds.

What OneVision changes against LLaVA-NeXT, kept at tiny sizes: every SigLIP patch token is kept
(``vision_feature_select_strategy="full"``), anyres tiles are pooled down when an image has more than
``anyres_max_N`` tiles' worth of features, and the language model is Qwen2 with ChatML turns.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

from vlm_dpo_plugins.tiny.data import tokenizer_corpus
from vlm_dpo_plugins.tiny.saving import save_with_tokenizer_ids
from vlm_dpo_plugins.tiny.tokenizer import train_byte_level_bpe, wrap_for_transformers

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
TILE_SIZE = 28
PATCH_SIZE = 14
GRID_PINPOINTS = [[28, 56], [56, 28], [56, 56]]

ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_llava_onevision(
    directory: str | Path, *, seed: int = 0, hidden_size: int = 32, layers: int = 2
) -> Path:
    """Save a random-weight tiny LLaVA-OneVision with its processor to ``directory`` and return the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, VIDEO_TOKEN]
    tokenizer = wrap_for_transformers(
        train_byte_level_bpe(tokenizer_corpus(), specials),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=ONEVISION_CHAT_TEMPLATE,
        extra_special_tokens=specials[1:],
    )
    tile = {"height": TILE_SIZE, "width": TILE_SIZE}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=tile, image_grid_pinpoints=GRID_PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=tile),
        tokenizer=tokenizer,
        num_image_tokens=(TILE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=TILE_SIZE,
            patch_size=PATCH_SIZE,
            vision_use_head=False,
        ),
        text_config=Qwen2Config(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    model_class = LlavaOnevisionForConditionalGeneration
    return save_with_tokenizer_ids(model_class, config, tokenizer, processor, directory, seed)
