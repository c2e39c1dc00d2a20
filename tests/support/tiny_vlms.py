"""Both tiny VLMs built and loaded fresh, for test modules that exercise every architecture."""

from __future__ import annotations

from pathlib import Path


def load_tiny_models(root: Path) -> dict:
    from transformers import AutoModelForImageTextToText

    from vlm_dpo_plugins.tiny import build_tiny_llava, build_tiny_qwen2_vl

    return {
        "llava": AutoModelForImageTextToText.from_pretrained(build_tiny_llava(root / "llava")),
        "qwen2_vl": AutoModelForImageTextToText.from_pretrained(build_tiny_qwen2_vl(root / "qwen")),
    }
