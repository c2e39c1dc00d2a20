"""A LLaVA-1.5-style model (CLIP vision tower, MLP projector, Llama) small enough to train on a CPU in seconds."""

from __future__ import annotations

from pathlib import Path

from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vlm_dpo_plugins.tiny.data import tokenizer_corpus
from vlm_dpo_plugins.tiny.saving import save_with_tokenizer_ids
from vlm_dpo_plugins.tiny.tokenizer import train_byte_level_bpe, wrap_for_transformers

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 28
PATCH_SIZE = 14
# (28 / 14)^2 patches; the CLS position is dropped by vision_feature_select_strategy="default".
IMAGE_TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2

# The llava-hf 1.5 conversation format: "USER: <image>\n{question} ASSISTANT: {answer}</s>".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}{{ ' ' }}"
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' ' }}"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def llava_tokenizer():
    """Llama-style byte-level BPE with ``<image>`` as a special token (the LLaVA family shares it)."""
    return wrap_for_transformers(
        train_byte_level_bpe(tokenizer_corpus(), ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=LLAVA_CHAT_TEMPLATE,
        extra_special_tokens=[IMAGE_TOKEN],
    )


def build_tiny_llava(
    directory: str | Path, *, seed: int = 0, hidden_size: int = 32, image_size: int = IMAGE_SIZE, layers: int = 2
) -> Path:
    """Save a random-weight tiny LLaVA with its processor to ``directory`` and return the path.

    ``image_size`` 224 gives LLaVA-1.5's shape of prompt, (224 / 14)^2 = 256 image tokens per image.

    The saved folder loads with ``from_pretrained`` like a hub checkpoint, which is
    what the frameworks need: TRL >= 0.29 builds its reference model from the path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = llava_tokenizer()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS; without it the count is one short per image
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=image_size,
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
            max_position_embeddings=max(512, 2 * (image_size // PATCH_SIZE) ** 2),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return save_with_tokenizer_ids(LlavaForConditionalGeneration, config, tokenizer, processor, directory, seed)
