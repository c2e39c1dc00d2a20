"""Functions run in spawned processes by distributed tests (spawn needs them importable by name)."""

from __future__ import annotations

import os

import torch.distributed as dist

from vlm_dpo_plugins.distributed import any_rank


def vote_to_skip_on_rank_one(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = (any_rank(rank == 1), any_rank(False))
    finally:
        dist.destroy_process_group()
