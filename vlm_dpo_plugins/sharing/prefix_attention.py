"""Attention of packed pairs without a dense mask: two calls of a fast kernel per packed row.

A packed row is ``[shared prompt | chosen branch | rejected branch | padding]`` (``packing.py``). Its attention
is exactly two causal attentions:

- the shared prompt and the chosen branch are an ordinary causal sequence: ``is_causal=True`` over its tokens;
- the rejected branch sees the shared prompt and itself: its queries against the keys ``[prompt, rejected]``,
  causal aligned to the bottom right (``causal_lower_right``): the i-th rejected query sees the whole prompt and
  the rejected tokens up to i.

Neither call takes a materialised mask, so PyTorch's SDPA stays free to pick its flash or memory-efficient
kernels, and no ``[B, 1, T, T]`` tensor exists. The function is installed over transformers' registered attention
functions (``AttentionInterface``: ``sdpa``, ``flash_attention_*``) as a dispatcher: a call that carries this
batch's ``PairLayout`` (the keyword argument ``LAYOUT_KEYWORD``, which transformers passes from the model's
forward down to every attention call) from a causal attention module is computed here, any other call goes to
the function the user chose, unchanged. Gradient checkpointing recomputes a layer with the arguments it saved,
the layout included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("vlm_dpo_plugins.sharing")

LAYOUT_KEYWORD = "vlm_dpo_pair_layout"
INTERCEPTED = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")
"""transformers' registered attention functions a packed row is computed in place of (eager is not registered:
eager models get the dense additive mask instead)."""
_INSTALLED_MARK = "__vlm_dpo_pair_attention__"


@dataclass
class PairLayout:
    """Where each packed row's three parts lie; handed to the model's forward, read by every attention call."""

    shared: tuple[int, ...]
    """Per packed row: tokens of the prompt both branches see (all but its last token)."""
    chosen: tuple[int, ...]
    """Per packed row: the chosen branch (the last prompt token, then the chosen response)."""
    rejected: tuple[int, ...]
    """Per packed row: the rejected branch (a copy of the last prompt token, then the rejected response)."""
    length: int
    """The packed rows' length, padding included."""
    dispatched: int = field(default=0, compare=False)
    """Attention calls computed from this layout: 0 after a forward means the model never passed it down."""

    @classmethod
    def of(cls, side: torch.Tensor, shared: int, chosen: int, rejected: int) -> PairLayout:
        """From ``PackedPairs.side`` (``[B, L]``: SHARED, CHOSEN, REJECTED, -1 on padding), read once on the host."""
        host = side.cpu()
        counts = [tuple(int(n) for n in (host == part).sum(dim=1)) for part in (shared, chosen, rejected)]
        return cls(*counts, length=side.shape[1])

    @property
    def rows(self) -> int:
        return len(self.shared)

    @property
    def longest_branch(self) -> int:
        """The longest prompt-and-response span of any row: the keys one query can reach, as in its own row."""
        return max(s + max(c, r) for s, c, r in zip(self.shared, self.chosen, self.rejected))


def pair_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: PairLayout,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``[B, H, L, D]`` queries, keys and values of packed rows -> ``[B, L, H, D]`` attention output (0 on padding)."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast casts SDPA's inputs, but the lower-right causal bias dispatches past it: cast them here, as it would.
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each key head serves a group of query heads
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    from torch.nn.attention.bias import causal_lower_right

    rows = []
    for row in range(layout.rows):
        shared, chosen, rejected = layout.shared[row], layout.chosen[row], layout.rejected[row]
        q, k, v = query[row : row + 1], key[row : row + 1], value[row : row + 1]
        head = slice(0, shared + chosen)
        tail = slice(shared + chosen, shared + chosen + rejected)
        parts = [
            F.scaled_dot_product_attention(
                q[:, :, head], k[:, :, head], v[:, :, head], dropout_p=dropout, is_causal=True, scale=scaling
            )
        ]
        if rejected:
            tail_keys = torch.cat((k[:, :, :shared], k[:, :, tail]), dim=2)
            tail_values = torch.cat((v[:, :, :shared], v[:, :, tail]), dim=2)
            bias = causal_lower_right(rejected, shared + rejected)
            parts.append(
                F.scaled_dot_product_attention(
                    q[:, :, tail], tail_keys, tail_values, attn_mask=bias, dropout_p=dropout, scale=scaling
                )
            )
        padding = layout.length - (shared + chosen + rejected)
        if padding:
            parts.append(q.new_zeros((1, q.shape[1], padding, v.shape[-1])))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous()


def _dispatcher(stock: Callable[..., Any]) -> Callable[..., Any]:
    def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
        layout = kwargs.pop(LAYOUT_KEYWORD, None)
        # The vision tower's attention gets the model's keyword arguments too, and cross-attention layers (Mllama)
        # attend from the packed tokens to image keys: only causal self-attention over the packed rows is a packed
        # row's attention.
        if (
            layout is None
            or not getattr(module, "is_causal", True)
            or query.shape[2] != layout.length
            or key.shape[2] != layout.length
        ):
            return stock(module, query, key, value, attention_mask, **kwargs)
        window = kwargs.get("sliding_window") or layout.longest_branch
        if query.shape[0] != layout.rows or window < layout.longest_branch:
            raise RuntimeError(
                f"vlm-dpo: a packed attention call does not match its layout ({query.shape[0]} rows for "
                f"{layout.rows}, sliding window {kwargs.get('sliding_window')}): sharing.attention: dense avoids it"
            )
        layout.dispatched += 1
        dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
        return pair_attention(query, key, value, layout, scaling=kwargs.get("scaling"), dropout=dropout), None

    setattr(attention, _INSTALLED_MARK, True)
    attention.__wrapped__ = stock
    return attention


def install() -> None:
    """The dispatcher over each registered attention function once (installing again changes nothing)."""
    from transformers.modeling_utils import AttentionInterface

    registered = AttentionInterface._global_mapping
    for name in INTERCEPTED:
        stock = registered.get(name)
        if stock is not None and not getattr(stock, _INSTALLED_MARK, False):
            AttentionInterface.register(name, _dispatcher(stock))


def dispatches_through_interface(implementation: str | None) -> bool:
    """Whether a model with this ``attn_implementation`` looks its attention function up in the registry."""
    return implementation in INTERCEPTED
