"""An Idefics3/SmolVLM-style model (SigLIP-like vision tower, pixel-shuffle connector, Llama) small enough to
train on a CPU in seconds.

Idefics3's own layout, kept at tiny sizes: an image larger than the encoder's input is split into a grid of
crops plus a downscaled global view; the prompt's ``<image>`` expands to, per crop,
``<fake_token_around_image><row_i_col_j>`` + ``image_seq_len`` × ``<image>``, then the global view's
``<fake_token_around_image><global-img>`` block, closed by ``<fake_token_around_image>``. The connector
folds ``scale_factor``² neighbouring patches into one token before its linear projection.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
)

from vlm_dpo_plugins.tiny.data import tokenizer_corpus
from vlm_dpo_plugins.tiny.saving import save_with_tokenizer_ids
from vlm_dpo_plugins.tiny.tokenizer import train_byte_level_bpe, wrap_for_transformers

IMAGE_TOKEN = "<image>"
ENCODER_SIZE = 32
PATCH_SIZE = 8
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (ENCODER_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
"""(32 / 8)^2 = 16 patches folded 2 × 2: 4 tokens per crop (SmolVLM: 1024 patches into 64)."""
LONGEST_EDGE = 2 * ENCODER_SIZE
"""Images are resized to this longest edge, then split into crops of ``ENCODER_SIZE``: up to 2 × 2 crops."""
GRID_TOKENS = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]

# SmolVLM-Instruct's turns: "<|im_start|>User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n"
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny_idefics3(directory: str | Path, *, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """Save a random-weight tiny Idefics3 with its processor to ``directory`` and return the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
                IMAGE_TOKEN, "<global-img>", *GRID_TOKENS]  # fmt: skip
    tokenizer = wrap_for_transformers(
        train_byte_level_bpe(tokenizer_corpus(), specials),
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<unk>",
        chat_template=IDEFICS3_CHAT_TEMPLATE,
        extra_special_tokens=specials[3:],
    )
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            do_image_splitting=True,
            size={"longest_edge": LONGEST_EDGE},
            max_image_size={"longest_edge": ENCODER_SIZE},
        ),
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=ENCODER_SIZE,
            patch_size=PATCH_SIZE,
        ),
        text_config=LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return save_with_tokenizer_ids(Idefics3ForConditionalGeneration, config, tokenizer, processor, directory, seed)
