"""Tiny random-weight vision-language models and synthetic preference data, built offline.

Used by the demo job and the tests: nothing here downloads anything, so every
model is built from a config, every tokenizer is trained on a small corpus with
the ``tokenizers`` library, and every image is drawn with Pillow.

Importing this package pulls in ``transformers``; the core package never does.
"""

from vlm_dpo_plugins.tiny.data import (
    PreferenceExample,
    make_preference_examples,
    trl_conversational_rows,
    write_preference_images,
)
from vlm_dpo_plugins.tiny.gemma3 import build_tiny_gemma3
from vlm_dpo_plugins.tiny.idefics3 import build_tiny_idefics3
from vlm_dpo_plugins.tiny.internvl import build_tiny_internvl
from vlm_dpo_plugins.tiny.llava import build_tiny_llava
from vlm_dpo_plugins.tiny.llava_next import build_tiny_llava_next
from vlm_dpo_plugins.tiny.llava_onevision import build_tiny_llava_onevision
from vlm_dpo_plugins.tiny.mistral3 import build_tiny_mistral3
from vlm_dpo_plugins.tiny.mllama import build_tiny_mllama
from vlm_dpo_plugins.tiny.paligemma import build_tiny_paligemma
from vlm_dpo_plugins.tiny.qwen2_5_vl import build_tiny_qwen2_5_vl
from vlm_dpo_plugins.tiny.qwen2_vl import build_tiny_qwen2_vl
from vlm_dpo_plugins.tiny.qwen3_vl import build_tiny_qwen3_vl

__all__ = [
    "PreferenceExample",
    "build_tiny_gemma3",
    "build_tiny_idefics3",
    "build_tiny_internvl",
    "build_tiny_qwen2_5_vl",
    "build_tiny_llava",
    "build_tiny_llava_next",
    "build_tiny_llava_onevision",
    "build_tiny_mistral3",
    "build_tiny_mllama",
    "build_tiny_paligemma",
    "build_tiny_qwen2_vl",
    "build_tiny_qwen3_vl",
    "make_preference_examples",
    "trl_conversational_rows",
    "write_preference_images",
]
