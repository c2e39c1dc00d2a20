"""Live DeepSpeed on CPU: a single-process gloo group per test module, torn down after it.

DeepSpeed picks its accelerator when it is first imported and compiles its shared-memory
communication op on the first engine (about 30 s, more on a busy machine); the compiled op
is cached in ``TORCH_EXTENSIONS_DIR``, which defaults here to a folder that outlives the
test environment, so later runs load it in about a second.
"""

from __future__ import annotations

import os

import pytest
from framework_cli import free_port, torch_extensions_dir

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())


@pytest.fixture
def master_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def deepspeed_process_group():
    """DeepSpeed initialised as rank 0 of 1, without a launcher (it would otherwise look for MPI)."""
    deepspeed = pytest.importorskip("deepspeed")
    import torch.distributed

    environment = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield deepspeed
        # Tests after this module start as they would without it: no process group, no DeepSpeed backend.
        deepspeed.comm.destroy_process_group()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        deepspeed.comm.comm.cdb = None
