"""A PaliGemma-style model (SigLIP tower, linear projector, Gemma as a prefix LM) small enough to train on a CPU
in seconds.

PaliGemma's own layout, kept at tiny sizes: a row is ``<image>`` × ``image_seq_length``, ``<bos>``, the prompt,
``\\n`` (the prefix), then the response and ``<eos>`` (the suffix). ``token_type_ids`` is 0 on the prefix and 1 on
the suffix: in training the prefix attends to itself both ways and the suffix causally. There is no chat
template: prompts and responses are plain text.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from vlm_dpo_plugins.tiny.data import tokenizer_corpus
from vlm_dpo_plugins.tiny.saving import save_with_tokenizer_ids
from vlm_dpo_plugins.tiny.tokenizer import train_byte_level_bpe

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 28
PATCH_SIZE = 14
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2
"""(28 / 14)^2 = 4 image tokens (PaliGemma-224: 256)."""


def build_tiny_paligemma(directory: str | Path, *, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """Save a random-weight tiny PaliGemma with its processor to ``directory`` and return the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", IMAGE_TOKEN]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_byte_level_bpe(tokenizer_corpus(), specials),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = IMAGE_SEQ_LENGTH
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=hidden_size,
            vision_use_head=False,
        ),
        text_config=GemmaConfig(
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
        projection_dim=hidden_size,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return save_with_tokenizer_ids(PaliGemmaForConditionalGeneration, config, tokenizer, processor, directory, seed)
