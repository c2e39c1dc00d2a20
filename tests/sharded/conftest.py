"""Two-rank runs on CPU over gloo, each rank a subprocess: DeepSpeed picks its CPU accelerator there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from framework_cli import free_port

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "vlm-dpo-plugins" / "torch_extensions"))


@pytest.fixture
def master_port() -> int:
    return free_port()
