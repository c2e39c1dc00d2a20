"""Two-rank runs on CPU over gloo, each rank a subprocess: DeepSpeed picks its CPU accelerator there."""

from __future__ import annotations

import os

import pytest
from framework_cli import free_port, torch_extensions_dir

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())


@pytest.fixture
def master_port() -> int:
    return free_port()
