"""Rank agreement. Any skip decision must be identical on every rank, or DDP/ZeRO ranks diverge and hang."""

from __future__ import annotations

import torch
import torch.distributed as dist


def any_rank(flag: bool, device: torch.device | str | None = None) -> bool:
    """True on every rank if ``flag`` is true on at least one rank (a no-op outside distributed runs)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    if device is None:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
