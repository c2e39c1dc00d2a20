"""A Mistral3-style model (Pixtral vision encoder, patch-merging projector, Mistral) small enough to train on a
CPU in seconds.

Pixtral's layout, kept at tiny sizes: each image keeps its aspect ratio (longest edge capped), is cut into
patches with 2D rotary positions, and after the projector merges ``spatial_merge_size``² neighbouring patches
its tokens are laid out row by row: ``[IMG]`` × columns then ``[IMG_BREAK]``, the last row closed by
``[IMG_END]``. So the token count follows each image's shape.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    MistralConfig,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
)

from vlm_dpo_plugins.tiny.data import tokenizer_corpus
from vlm_dpo_plugins.tiny.saving import save_with_tokenizer_ids
from vlm_dpo_plugins.tiny.tokenizer import train_byte_level_bpe, wrap_for_transformers

IMAGE_TOKEN, BREAK, END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
PATCH_SIZE = 14
MERGE_SIZE = 2
LONGEST_EDGE = 56
"""At most (56 / 14)^2 = 16 patches, merged 2 × 2 into 4 image tokens per image (plus the row markers)."""

# Mistral's instruct turns: "<s>[INST]question[IMG]...[/INST]answer</s>"
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}[IMG]{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}[/INST]"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def build_tiny_mistral3(directory: str | Path, *, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """Save a random-weight tiny Mistral3 with its processor to ``directory`` and return the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", IMAGE_TOKEN, BREAK, END]
    tokenizer = wrap_for_transformers(
        train_byte_level_bpe(tokenizer_corpus(), specials),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=MISTRAL3_CHAT_TEMPLATE,
        extra_special_tokens=specials[4:],
    )
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(size={"longest_edge": LONGEST_EDGE}, patch_size=PATCH_SIZE),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        chat_template=MISTRAL3_CHAT_TEMPLATE,
    )
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=LONGEST_EDGE,
            patch_size=PATCH_SIZE,
        ),
        text_config=MistralConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        spatial_merge_size=MERGE_SIZE,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return save_with_tokenizer_ids(Mistral3ForConditionalGeneration, config, tokenizer, processor, directory, seed)
