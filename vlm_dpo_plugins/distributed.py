"""Rank agreement. Any skip decision must be identical on every rank, or DDP/ZeRO ranks diverge and hang.

Every function is a no-op outside an initialised process group with more than one
rank, and a collective inside one: every rank must call it, in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def max_across_ranks(values: Sequence[float], device: torch.device | str | None = None) -> list[float]:
    """The element-wise maximum of ``values`` over all ranks, in one collective."""
    return _all_reduce(values, "MAX", device)


def sum_across_ranks(values: Sequence[float], device: torch.device | str | None = None) -> list[float]:
    """The element-wise sum of ``values`` over all ranks, in one collective."""
    return _all_reduce(values, "SUM", device)


def _all_reduce(values: Sequence[float], op: str, device: torch.device | str | None) -> list[float]:
    if not is_distributed():
        return [float(value) for value in values]
    if device is None:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([float(value) for value in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.tolist()


def any_rank(flag: bool, device: torch.device | str | None = None) -> bool:
    """True on every rank if ``flag`` is true on at least one rank."""
    return max_across_ranks([1.0 if flag else 0.0], device)[0] > 0


def gather_from_ranks(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
