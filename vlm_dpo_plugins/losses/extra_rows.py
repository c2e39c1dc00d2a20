"""Rows beyond the pairs: what a loss variant's ``extras`` are computed from, run in the same forward as the pairs.

Every framework collates a preference batch as B chosen rows, then B rejected rows. A variant that needs more
log-probs than the pairs' (mDPO: the chosen response under a corrupted image) names them in
``LossInputs.extras``; for each name a plugin provides, through ``vlm_dpo_extra_rows``, an ``ExtraRows``: how to
build B more rows from the collated batch, and under which ``extras`` keys the policy's and the reference's
summed log-probs of those rows go. The adapters append the rows to the batch, so one forward serves all of them
(DDP fails on two forwards before one backward), and ``compute_preference_loss`` splits them off again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vlm_dpo_plugins.errors import PluginError
from vlm_dpo_plugins.losses.logprobs import SequenceLogps
from vlm_dpo_plugins.types import LossInputs

RowDims = Mapping[str, int]


@dataclass(frozen=True)
class ExtraRows:
    """B more rows, built from a collated batch of 2B rows, and the ``extras`` keys of their log-probs."""

    name: str
    rows: Callable[[Mapping[str, Any], RowDims], dict[str, torch.Tensor]]
    """``rows(batch, row_dims)``: the new block of every tensor of the batch that has rows (per row or per image),
    to append along its row dimension; ``row_dims`` names tensors whose rows are not along dimension 0."""
    policy_key: str
    reference_key: str | None = None


def row_dims(batch: Mapping[str, Any]) -> dict[str, int]:
    """Tensors whose rows are not along dimension 0: M-RoPE positions (Qwen2-VL family) are ``[3, rows, length]``."""
    position_ids = batch.get("position_ids")
    return {"position_ids": 1} if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 3 else {}


def resolve(plugins: Any, needs: LossInputs, loss_type: str) -> tuple[ExtraRows, ...]:
    """The row blocks behind the ``extras`` keys ``loss_type`` reads, each once, in the order the keys name them."""
    blocks: list[ExtraRows] = []
    for key in needs.extras:
        block = plugins.hook.vlm_dpo_extra_rows(extras_key=key)
        if block is None:
            raise PluginError(
                f"loss.type {loss_type!r} reads PreferenceLogps.extras[{key!r}], but no plugin says how to compute "
                "it: implement vlm_dpo_extra_rows for that key (see vlm_dpo_plugins/hookspecs.py)"
            )
        if not isinstance(block, ExtraRows):
            raise PluginError(f"vlm_dpo_extra_rows({key!r}) returned {type(block).__name__}, not an ExtraRows")
        if block not in blocks:
            blocks.append(block)
    return tuple(blocks)


def extend_batch(batch: Mapping[str, Any], blocks: Iterable[ExtraRows]) -> dict[str, Any]:
    """The 2B-row batch with every block's rows appended, in order, along each tensor's row dimension."""
    dims = row_dims(batch)
    extended = dict(batch)
    for block in blocks:
        for key, rows in block.rows(batch, dims).items():
            extended[key] = torch.cat((extended[key], rows), dim=dims.get(key, 0))
    return extended


def split_extras(
    policy: SequenceLogps, reference: SequenceLogps | None, pairs: int, blocks: Iterable[ExtraRows]
) -> tuple[SequenceLogps, SequenceLogps | None, dict[str, torch.Tensor]]:
    """The pairs' 2B rows, and each block's B rows as its ``extras`` (policy, then reference)."""
    extras: dict[str, torch.Tensor] = {}
    start = 2 * pairs
    for block in blocks:
        policy_block = _rows(policy, start, pairs)
        extras[block.policy_key] = policy_block.logps
        if block.reference_key is not None:
            if reference is None:
                raise PluginError(f"the {block.name} rows need a reference pass, and none ran")
            reference_block = _rows(reference, start, pairs)
            if not torch.equal(policy_block.token_counts.cpu(), reference_block.token_counts.cpu()):
                raise ValueError(
                    f"{block.name} rows: policy and reference summed different numbers of response tokens "
                    f"({policy_block.token_counts.tolist()} vs {reference_block.token_counts.tolist()}); run both on "
                    "the same batch"
                )
            extras[block.reference_key] = reference_block.logps
        start += pairs
    policy = _rows(policy, 0, 2 * pairs)
    reference = None if reference is None else _rows(reference, 0, 2 * pairs)
    return policy, reference, extras


def _rows(logps: SequenceLogps, start: int, count: int) -> SequenceLogps:
    return SequenceLogps(logps.logps[start : start + count], logps.token_counts[start : start + count])
