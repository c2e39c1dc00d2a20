"""Position ids of packed pairs, including the 3D (temporal, height, width) rotary positions of Qwen2-VL-style models.

1D positions come from the packing itself. A model with multimodal rotary positions computes them with its
own ``get_rope_index`` (image tokens get grid positions, the text after them continues from the largest);
that runs on the packed rows, and the rejected branch, text after the prompt like the chosen one, is then
given the positions the chosen branch starts with.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from vlm_dpo_plugins.sharing.packing import REJECTED, PackedPairs

ROPE_INDEX_INPUTS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids")


def rope_index_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The innermost module with ``get_rope_index`` (the one whose forward computes mrope positions), if any."""
    found = None
    for module in model.modules():
        if callable(getattr(type(module), "get_rope_index", None)):
            found = module  # modules() goes outer to inner: keep the last
    return found


def packed_position_ids(
    model: torch.nn.Module, packed: PackedPairs, packed_inputs: Mapping[str, Any], image_inputs: Mapping[str, Any]
) -> torch.Tensor:
    """``[B, L]`` 1D positions, or ``[3, B, L]`` for a model with multimodal rotary positions."""
    module = rope_index_module(model)
    if module is None:
        return packed.positions
    parameters = inspect.signature(module.get_rope_index).parameters
    kwargs = {key: value for key, value in {**image_inputs, **packed_inputs}.items() if key in ROPE_INDEX_INPUTS}
    kwargs = {key: value for key, value in kwargs.items() if key in parameters}
    kwargs["attention_mask"] = packed.token_mask.long()
    positions, _ = module.get_rope_index(packed_inputs["input_ids"], **kwargs)
    return _restart_rejected_branch(positions.clone(), packed)


def _restart_rejected_branch(positions: torch.Tensor, packed: PackedPairs) -> torch.Tensor:
    for pair in range(packed.pairs):
        branch = (packed.side[pair] == REJECTED).nonzero().flatten()
        if branch.numel() == 0:
            continue
        start = int(branch[0])
        # The branch opens with a copy of the last prompt token: same positions as the original, which sits at the
        # end of the shared part (the chosen branch opens with it).
        last_prompt = _last_prompt_index(packed, pair, start)
        positions[:, pair, start] = positions[:, pair, last_prompt]
        first_response = positions[:, pair, : last_prompt + 1].max() + 1
        rest = branch[1:]
        positions[:, pair, rest] = first_response + torch.arange(rest.numel(), device=positions.device)
    return positions


def _last_prompt_index(packed: PackedPairs, pair: int, branch_start: int) -> int:
    row, column = packed.source_row[pair, branch_start], packed.source_column[pair, branch_start]
    same = (packed.source_row[pair, :branch_start] == row) & (packed.source_column[pair, :branch_start] == column)
    return int(same.nonzero().flatten()[0])
