"""Pack each preference pair into one sequence: the prompt once, then the chosen and the rejected response.

Every framework collates a pair as two rows, ``[prompt, chosen]`` and ``[prompt, rejected]``, so
the language model reads the prompt twice per pass. Packed, a pair is one row::

    P0 .. Pp-2 | Pp-1  C0 .. Cc-1 | Pp-1' R0 .. Rr-1
    shared       chosen branch      rejected branch

The rejected branch starts with a copy of the last prompt token (``Pp-1'``) at the same
position. Its hidden state equals the original's (same token, same position, same visible
tokens), so the logits there predict ``R0`` the way ``Pp-1`` predicts ``C0``, and both
responses are scored by the ordinary one-token shift: a plain ``labels`` tensor works with
any LM head, fused or not. Each branch sees the shared prompt and itself, never the other
branch; the rejected branch's positions restart where the chosen branch's start. The
log-probs of every response token are then those of the two-row computation.

Packing is a gather: every packed position names the (row, column) of the collated batch it
comes from, so any per-token tensor (``input_ids``, ``mm_token_type_ids``, ...) packs the same
way, and per-token outputs map back to the two-row layout (``unpack``) where the adapters'
loss and metrics code reads them unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100

SHARED, CHOSEN, REJECTED = 0, 1, 2
"""Which tokens of a packed row see which: a token sees the SHARED prompt and earlier tokens of its own side."""


class PackingUnavailable(Exception):
    """This batch cannot be packed (the reason says why); the caller runs the two-row computation instead."""


@dataclass(frozen=True)
class PackedPairs:
    """B packed rows built from a collated batch of 2B rows (B chosen rows, then B rejected rows)."""

    source_row: torch.Tensor
    """[B, L]: the collated row each packed position is read from (0 on padding)."""
    source_column: torch.Tensor
    """[B, L]: the column in that row."""
    side: torch.Tensor
    """[B, L]: SHARED, CHOSEN or REJECTED; -1 on padding."""
    positions: torch.Tensor
    """[B, L]: 1D position ids, restarting for the rejected branch (0 on padding)."""
    scored_row: torch.Tensor
    """[N]: for each response token scored, its collated row ..."""
    scored_column: torch.Tensor
    """[N]: ... and column (the label position, unshifted) ..."""
    packed_row: torch.Tensor
    """[N]: ... and where that token sits in the packed batch."""
    packed_column: torch.Tensor
    collated_shape: tuple[int, int]

    @property
    def pairs(self) -> int:
        return self.side.shape[0]

    @property
    def length(self) -> int:
        return self.side.shape[1]

    @property
    def token_mask(self) -> torch.Tensor:
        return self.side >= 0

    def gather(self, per_token: torch.Tensor, fill: int | float = 0) -> torch.Tensor:
        """A collated ``[2B, T]`` per-token tensor in packed layout, ``fill`` on padding.

        ``[K, 2B, T]`` (Qwen2-VL's mrope ``position_ids`` as LLaMA-Factory and ms-swift collate them) packs
        along its last two dimensions; ``[2B, T, ...]`` (Mllama's ``cross_attention_mask``, ``[2B, T, images,
        tiles]``) along its first two.
        """
        if per_token.ndim == 3 and per_token.shape[1:] == self.collated_shape:
            packed = per_token[:, self.source_row, self.source_column]
            return packed.masked_fill(~self.token_mask[None], fill)
        packed = per_token[self.source_row, self.source_column]
        padding = ~self.token_mask
        return packed.masked_fill(padding.view(*padding.shape, *[1] * (packed.ndim - 2)), fill)

    def labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Packed labels: the scored response tokens' ids, ``IGNORE_INDEX`` everywhere else."""
        labels = torch.full_like(self.side, IGNORE_INDEX)
        labels[self.packed_row, self.packed_column] = input_ids[self.scored_row, self.scored_column]
        return labels

    def visible(self, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, 1, L, L]``, True where a query (dim 2) may attend to a key (dim 3).

        ``blocks``: ``[B, L]`` ids of tokens that attend to each other both ways (-1: none), as some models' image
        tokens or prefix do in training (``attention_patterns.py``). A block lies in the prompt; it may end with the
        prompt's last token, which opens the chosen branch, and the shared prompt then sees it as in its own row
        (the rejected branch's copy of that token is a block of its own, seen by its branch alone).
        """
        index = torch.arange(self.length, device=self.side.device)
        causal = index[None, :, None] >= index[None, None, :]
        query_side, key_side = self.side[:, :, None], self.side[:, None, :]
        visible = causal & ((key_side == SHARED) | (key_side == query_side))
        if blocks is not None:
            visible = visible | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
        visible = visible & (query_side >= 0) & (key_side >= 0)
        # A padding query sees only itself, so no row of the softmax is empty.
        visible |= torch.eye(self.length, dtype=torch.bool, device=self.side.device)[None]
        return visible[:, None]

    def attention_bias(self, dtype: torch.dtype, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, 1, L, L]`` additive mask: 0 where a query may attend to a key, the dtype's minimum elsewhere."""
        visible = self.visible(blocks)
        bias = torch.zeros(visible.shape, dtype=dtype, device=self.side.device)
        return bias.masked_fill_(~visible, torch.finfo(dtype).min)

    def unpack(self, per_token_shifted: torch.Tensor) -> torch.Tensor:
        """Shifted per-token outputs ``[B, L - 1]`` (position t scores token t + 1) in collated ``[2B, T - 1]`` layout.

        Only the scored response tokens are carried over; everything else is 0, as the adapters mask it anyway.
        """
        rows, columns = self.collated_shape
        out = per_token_shifted.new_zeros((rows, columns - 1, *per_token_shifted.shape[2:]))
        out[self.scored_row, self.scored_column - 1] = per_token_shifted[self.packed_row, self.packed_column - 1]
        return out


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> PackedPairs:
    """Pack a collated 2B-row batch; ``response_mask`` is 1 on the response tokens to score (TRL's completion_mask).

    A row's prompt is its attended tokens before its first response token, its response every attended token
    from there on (tokens there outside ``response_mask`` are kept in the sequence but not scored). Raises
    ``PackingUnavailable`` when a pair's two rows do not start with the same prompt.
    """
    rows, length = input_ids.shape
    if rows % 2:
        raise PackingUnavailable(f"expected 2B rows (chosen, then rejected), got {rows}")
    pairs = rows // 2
    attended = attention_mask.bool()
    scored = response_mask.bool() & attended
    layouts = [_pair_layout(input_ids, attended, scored, pair, pairs) for pair in range(pairs)]
    packed_length = max(layout.length for layout in layouts)

    def grid(fill: int) -> torch.Tensor:
        return torch.full((pairs, packed_length), fill, dtype=torch.long)

    source_row, source_column, side, positions = grid(0), grid(0), grid(-1), grid(0)
    scored_parts: list[tuple[int, int, int, int]] = []
    for pair, layout in enumerate(layouts):
        end = layout.length
        source_row[pair, :end] = layout.rows
        source_column[pair, :end] = layout.columns
        side[pair, :end] = layout.sides
        positions[pair, :end] = layout.positions
        scored_parts.extend((row, column, pair, at) for row, column, at in layout.scored)
    device = input_ids.device
    scored_index = torch.tensor(scored_parts, dtype=torch.long).reshape(-1, 4).T
    return PackedPairs(
        source_row=source_row.to(device),
        source_column=source_column.to(device),
        side=side.to(device),
        positions=positions.to(device),
        scored_row=scored_index[0].to(device),
        scored_column=scored_index[1].to(device),
        packed_row=scored_index[2].to(device),
        packed_column=scored_index[3].to(device),
        collated_shape=(rows, length),
    )


@dataclass(frozen=True)
class _Layout:
    rows: torch.Tensor
    columns: torch.Tensor
    sides: torch.Tensor
    positions: torch.Tensor
    scored: list[tuple[int, int, int]]
    """(collated row, collated column, packed column) of each scored token."""

    @property
    def length(self) -> int:
        return self.rows.shape[0]


def _pair_layout(
    input_ids: torch.Tensor, attended: torch.Tensor, scored: torch.Tensor, pair: int, pairs: int
) -> _Layout:
    chosen_row, rejected_row = pair, pair + pairs
    chosen_prompt, chosen_response = _split(attended[chosen_row], scored[chosen_row], chosen_row)
    rejected_prompt, rejected_response = _split(attended[rejected_row], scored[rejected_row], rejected_row)
    if chosen_prompt.numel() != rejected_prompt.numel() or not torch.equal(
        input_ids[chosen_row, chosen_prompt], input_ids[rejected_row, rejected_prompt]
    ):
        raise PackingUnavailable(
            f"pair {pair}: the chosen row ({chosen_row}) and the rejected row ({rejected_row}) do not start with the "
            "same prompt tokens"
        )
    prompt_length = chosen_prompt.numel()
    chosen_length, rejected_length = chosen_response.numel(), rejected_response.numel()
    last_prompt = chosen_prompt[-1:]
    rows = torch.cat(
        (
            torch.full((prompt_length + chosen_length,), chosen_row),
            torch.full((1,), chosen_row),
            torch.full((rejected_length,), rejected_row),
        )
    )
    columns = torch.cat((chosen_prompt, chosen_response, last_prompt, rejected_response))
    sides = torch.cat(
        (
            torch.full((prompt_length - 1,), SHARED),
            torch.full((1 + chosen_length,), CHOSEN),
            torch.full((1 + rejected_length,), REJECTED),
        )
    )
    # The columns' own positions, as the two-row computation gives them; the rejected branch continues from the
    # last prompt token like the chosen one.
    positions = torch.cat((chosen_prompt, chosen_response, last_prompt + torch.arange(1 + rejected_length)))
    chosen_scored = scored[chosen_row, chosen_response]
    rejected_scored = scored[rejected_row, rejected_response]
    rejected_start = prompt_length + chosen_length + 1
    scored_tokens = [
        (chosen_row, int(column), prompt_length + offset)
        for offset, column in enumerate(chosen_response.tolist())
        if chosen_scored[offset]
    ] + [
        (rejected_row, int(column), rejected_start + offset)
        for offset, column in enumerate(rejected_response.tolist())
        if rejected_scored[offset]
    ]
    return _Layout(rows, columns, sides, positions, scored_tokens)


def _split(attended: torch.Tensor, scored: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices of a row's prompt and of its response (attended tokens from the first scored one on)."""
    columns = attended.nonzero().flatten().cpu()
    scored_columns = scored.nonzero().flatten()
    if scored_columns.numel() == 0:
        raise PackingUnavailable(f"row {row} has no response token to score, so its prompt cannot be told apart")
    first = int(scored_columns[0])
    prompt, response = columns[columns < first], columns[columns >= first]
    if prompt.numel() == 0:
        raise PackingUnavailable(f"row {row} has no prompt token before its response")
    return prompt, response


def packed_per_token_inputs(
    packed: PackedPairs, batch: Mapping[str, Any], per_token_keys: frozenset[str], pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """Every per-token tensor of ``batch`` named in ``per_token_keys`` (except attention_mask), in packed layout."""
    out = {}
    for key in per_token_keys:
        value = batch.get(key)
        if key == "attention_mask" or not isinstance(value, torch.Tensor):
            continue
        out[key] = packed.gather(value, fill=pad_token_id if key == "input_ids" else 0)
    return out
