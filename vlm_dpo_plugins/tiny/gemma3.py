"""A Gemma 3-style model (SigLIP vision tower, pooled multimodal projector, Gemma 3 text with sliding-window and
global layers) small enough to train on a CPU in seconds.

Gemma 3's own layout, kept at tiny sizes: the prompt's ``<start_of_image>`` placeholder expands to
``\\n\\n<start_of_image>`` + ``mm_tokens_per_image`` × ``<image_soft_token>`` + ``<end_of_image>\\n\\n``; the soft
tokens are the ones the model replaces with image features (``config.image_token_id``), and the processor's
``token_type_ids`` mark them, so training attends bidirectionally within each image.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from vlm_dpo_plugins.tiny.data import tokenizer_corpus
from vlm_dpo_plugins.tiny.saving import save_with_tokenizer_ids
from vlm_dpo_plugins.tiny.tokenizer import train_byte_level_bpe

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
IMAGE_SIZE = 56
PATCH_SIZE = 14
MM_TOKENS_PER_IMAGE = 4
"""(56 / 14)^2 = 16 patches, average-pooled 2 × 2 into 4 soft tokens (the released models: 4096 into 256)."""
SLIDING_WINDOW = 512

GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def build_tiny_gemma3(directory: str | Path, *, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """Save a random-weight tiny Gemma 3 with its processor to ``directory`` and return the path.

    The layers alternate as the released models' do (sliding-window, then global); the window is wider than the
    tiny pairs, so it never cuts one off.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", BOI, EOI, SOFT]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_byte_level_bpe(tokenizer_corpus(), specials),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": SOFT},
    )
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    )
    head_dim = 16
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            vision_use_head=False,
        ),
        text_config=Gemma3TextConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=head_dim,
            vocab_size=len(tokenizer),
            max_position_embeddings=2048,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention" if index % 2 == 0 else "full_attention" for index in range(layers)],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=tokenizer.convert_tokens_to_ids(BOI),
        eoi_token_index=tokenizer.convert_tokens_to_ids(EOI),
        image_token_index=tokenizer.convert_tokens_to_ids(SOFT),
    )
    return save_with_tokenizer_ids(Gemma3ForConditionalGeneration, config, tokenizer, processor, directory, seed)
