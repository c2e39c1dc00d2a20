"""Tiny VLMs and synthetic image preferences for the TRL adapter's end-to-end runs."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    from vlm_dpo_plugins.tiny import (
        build_tiny_gemma3,
        build_tiny_idefics3,
        build_tiny_internvl,
        build_tiny_llava,
        build_tiny_llava_next,
        build_tiny_llava_onevision,
        build_tiny_mistral3,
        build_tiny_mllama,
        build_tiny_paligemma,
        build_tiny_qwen2_5_vl,
        build_tiny_qwen2_vl,
        build_tiny_qwen3_vl,
    )

    root = tmp_path_factory.mktemp("tiny-vlms")
    return {
        "llava": build_tiny_llava(root / "llava"),
        "qwen2_vl": build_tiny_qwen2_vl(root / "qwen2_vl"),
        "qwen2_5_vl": build_tiny_qwen2_5_vl(root / "qwen2_5_vl"),
        "gemma3": build_tiny_gemma3(root / "gemma3"),
        "qwen3_vl": build_tiny_qwen3_vl(root / "qwen3_vl"),
        "idefics3": build_tiny_idefics3(root / "idefics3"),
        "llava_next": build_tiny_llava_next(root / "llava_next"),
        "llava_onevision": build_tiny_llava_onevision(root / "llava_onevision"),
        "mistral3": build_tiny_mistral3(root / "mistral3"),
        "internvl": build_tiny_internvl(root / "internvl"),
        "mllama": build_tiny_mllama(root / "mllama"),
        "paligemma": build_tiny_paligemma(root / "paligemma"),
    }


@pytest.fixture(scope="session")
def preference_rows() -> list[dict]:
    from vlm_dpo_plugins.tiny import make_preference_examples, trl_conversational_rows

    return trl_conversational_rows(make_preference_examples(16, seed=3))
