"""A Mllama-style model (Llama 3.2 Vision: tiled vision encoder, Llama with gated cross-attention layers) small
enough to train on a CPU in seconds.

Mllama does not put image features into the token sequence: the prompt holds one ``<|image|>`` token per image,
the vision encoder's output is attended to by the cross-attention layers only, and ``cross_attention_mask``
(``[batch, tokens, images, tiles]``) says which tiles each token may attend to: every token from its image's
``<|image|>`` on, responses included. Images are resized to the best-fitting grid of up to ``max_image_tiles``
encoder-sized tiles.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessor,
    MllamaProcessor,
    MllamaTextConfig,
    MllamaVisionConfig,
)

from vlm_dpo_plugins.tiny.data import tokenizer_corpus
from vlm_dpo_plugins.tiny.saving import save_with_tokenizer_ids
from vlm_dpo_plugins.tiny.tokenizer import train_byte_level_bpe, wrap_for_transformers

IMAGE_TOKEN = "<|image|>"
TILE_SIZE = 28
PATCH_SIZE = 14
MAX_TILES = 4

# Llama 3.2 Vision Instruct's turns, images first in the user turn.
MLLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_tiny_mllama(directory: str | Path, *, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """Save a random-weight tiny Mllama with its processor to ``directory`` and return the path.

    The language model has ``layers`` self-attention layers and one cross-attention layer between them.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", IMAGE_TOKEN]  # fmt: skip
    tokenizer = wrap_for_transformers(
        train_byte_level_bpe(tokenizer_corpus(), specials),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        chat_template=MLLAMA_CHAT_TEMPLATE,
        extra_special_tokens=specials[1:],
    )
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": TILE_SIZE, "width": TILE_SIZE}, max_image_tiles=MAX_TILES),
        tokenizer=tokenizer,
        chat_template=MLLAMA_CHAT_TEMPLATE,
    )
    config = MllamaConfig(
        vision_config=MllamaVisionConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_global_layers=1,
            attention_heads=2,
            image_size=TILE_SIZE,
            patch_size=PATCH_SIZE,
            max_num_tiles=MAX_TILES,
            intermediate_layers_indices=[0],
            vision_output_dim=hidden_size * 2,  # the last layer's output and one intermediate layer's
        ),
        text_config=MllamaTextConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers + 1,
            num_attention_heads=2,
            num_key_value_heads=1,
            cross_attention_layers=[1],
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    config.pad_token_id = tokenizer.pad_token_id
    return save_with_tokenizer_ids(MllamaForConditionalGeneration, config, tokenizer, processor, directory, seed)
