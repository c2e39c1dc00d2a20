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

from vlm_dpo_plugins.sharing.packing import CHOSEN, REJECTED, PackedPairs

ROPE_INDEX_INPUTS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids")


class RopeIndex:
    """How a model computes its position ids, found once: a module walk and a signature read per batch add up."""

    def __init__(self, module: torch.nn.Module | None):
        self.module = module
        parameters = inspect.signature(module.get_rope_index).parameters if module is not None else {}
        self._inputs = tuple(key for key in ROPE_INDEX_INPUTS if key in parameters)

    @classmethod
    def of(cls, model: torch.nn.Module) -> RopeIndex:
        """The innermost module with ``get_rope_index`` (the one whose forward computes mrope positions), if any."""
        found = None
        for module in model.modules():
            if callable(getattr(type(module), "get_rope_index", None)):
                found = module  # modules() goes outer to inner: keep the last
        return cls(found)

    def positions(
        self, packed: PackedPairs, packed_inputs: Mapping[str, Any], image_inputs: Mapping[str, Any]
    ) -> torch.Tensor:
        """``[B, L]`` 1D positions, or ``[3, B, L]`` for a model with multimodal rotary positions."""
        if self.module is None:
            return packed.positions
        given = {**image_inputs, **packed_inputs}
        kwargs = {key: given[key] for key in self._inputs if key in given}
        kwargs["attention_mask"] = packed.token_mask.long()
        positions, _ = self.module.get_rope_index(packed_inputs["input_ids"], **kwargs)
        return _restart_rejected_branch(positions.clone(), packed)


def _restart_rejected_branch(positions: torch.Tensor, packed: PackedPairs) -> torch.Tensor:
    for pair in range(packed.pairs):
        branch = (packed.side[pair] == REJECTED).nonzero().flatten()
        if branch.numel() == 0:
            continue
        # The branch opens with a copy of the last prompt token: same positions as the original, which opens the
        # chosen branch.
        last_prompt = int((packed.side[pair] == CHOSEN).nonzero()[0])
        positions[:, pair, branch[0]] = positions[:, pair, last_prompt]
        first_response = positions[:, pair, : last_prompt + 1].max() + 1
        rest = branch[1:]
        positions[:, pair, rest] = first_response + torch.arange(rest.numel(), device=positions.device)
    return positions
