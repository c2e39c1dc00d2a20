"""Shared test setup: everything runs offline, and only the plugins a test registers take part."""

from __future__ import annotations

import os

# Set before transformers/huggingface_hub are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
