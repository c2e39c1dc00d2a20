"""An InternVL-style model (InternViT, pixel-shuffle MLP projector, Qwen2 in ChatML) small enough to train on a
CPU in seconds.

InternVL's own layout, kept at tiny sizes: an image is cut into up to ``max_patches`` encoder-sized crops on
the grid closest to its aspect ratio, plus a thumbnail; each crop's patches are pixel-shuffled
(``downsample_ratio`` 0.5: 2 × 2 patches into one token), and the prompt's ``<IMG_CONTEXT>`` expands to
``<img>`` + crops × ``image_seq_length`` × ``<IMG_CONTEXT>`` + ``</img>``.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from vlm_dpo_plugins.tiny.data import tokenizer_corpus
from vlm_dpo_plugins.tiny.saving import save_with_tokenizer_ids
from vlm_dpo_plugins.tiny.tokenizer import train_byte_level_bpe

START, END, CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
CROP_SIZE = 28
PATCH_SIZE = 14
IMAGE_SEQ_LENGTH = (CROP_SIZE // PATCH_SIZE) ** 2 // 4
"""(28 / 14)^2 = 4 patches per crop, pixel-shuffled 2 × 2 into 1 token (InternVL3: 1024 into 256)."""
MAX_CROPS = 4

INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<IMG_CONTEXT>\n{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_internvl(directory: str | Path, *, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """Save a random-weight tiny InternVL with its processor to ``directory`` and return the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", START, END, CONTEXT, VIDEO]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_byte_level_bpe(tokenizer_corpus(), specials),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        # InternVL's processor reads these names off the tokenizer.
        extra_special_tokens={
            "start_image_token": START,
            "end_image_token": END,
            "context_image_token": CONTEXT,
            "video_token": VIDEO,
        },
    )
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size={"height": CROP_SIZE, "width": CROP_SIZE}, crop_to_patches=True, min_patches=1, max_patches=MAX_CROPS
        ),
        video_processor=InternVLVideoProcessor(size={"height": CROP_SIZE, "width": CROP_SIZE}),
        tokenizer=tokenizer,
        image_seq_length=IMAGE_SEQ_LENGTH,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=[CROP_SIZE, CROP_SIZE],
            patch_size=[PATCH_SIZE, PATCH_SIZE],
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
        image_token_id=tokenizer.convert_tokens_to_ids(CONTEXT),
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return save_with_tokenizer_ids(InternVLForConditionalGeneration, config, tokenizer, processor, directory, seed)
