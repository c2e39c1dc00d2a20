"""A BOS token that a processor put at the start of every response, taken out of the collated rows.

Some processors start every text they tokenize with the BOS token (Mllama's). A collator that tokenizes the
prompt and each response in separate processor calls (TRL's vision collator) then trains on
``[BOS, prompt ..., BOS, response ...]``: the response's first scored token is a BOS the model is taught to
produce in mid-sequence, and the response's log-probs include it. The rows are closed up here, before the
checks and the model see them: the BOS goes, the rest of the row moves left one place, the row ends in padding.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import torch

logger = logging.getLogger("vlm_dpo_plugins.collation")


def drop_response_bos(batch: MutableMapping[str, Any], bos_token_id: int, pad_token_id: int) -> int:
    """Close up each row whose response (``completion_mask``) starts with BOS; the number of rows changed.

    Every ``[rows, tokens, ...]`` tensor of the batch moves with ``input_ids``; ``input_ids`` is padded with
    ``pad_token_id``, everything else with 0.
    """
    input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]
    rows, length = input_ids.shape
    has_response = completion_mask.bool().any(dim=1)
    first = completion_mask.int().argmax(dim=1)
    starts_with_bos = has_response & (input_ids.gather(1, first[:, None])[:, 0] == bos_token_id)
    if not starts_with_bos.any():
        return 0
    # Each kept position reads the next one from the response's first token on.
    columns = torch.arange(length, device=input_ids.device).expand(rows, length)
    shift = (columns >= first[:, None]) & starts_with_bos[:, None]
    source = (columns + shift.long()).clamp(max=length - 1)
    beyond = shift & (columns == length - 1)
    for key, value in list(batch.items()):
        if not isinstance(value, torch.Tensor) or value.shape[:2] != (rows, length):
            continue
        index = source.view(rows, length, *[1] * (value.ndim - 2)).expand_as(value)
        moved = value.gather(1, index)
        fill = pad_token_id if key == "input_ids" else 0
        batch[key] = moved.masked_fill(beyond.view(rows, length, *[1] * (value.ndim - 2)), fill)
    return int(starts_with_bos.sum())


class ResponsesWithoutBos:
    """A collator whose batches have no BOS at the start of a response (see the module docstring); said once."""

    def __init__(self, collator: Any, bos_token_id: int, pad_token_id: int, framework: str) -> None:
        self.collator = collator
        self.bos_token_id, self.pad_token_id = bos_token_id, pad_token_id
        self.framework = framework
        self._announced = False

    def __call__(self, examples: list[Any]) -> Any:
        batch = self.collator(examples)
        changed = drop_response_bos(batch, self.bos_token_id, self.pad_token_id)
        if changed and not self._announced:
            self._announced = True
            logger.info(
                "vlm-dpo: %s tokenizes each response through the processor, which starts it with the BOS token: "
                "taken out of the responses (%d of the first batch's %d rows)",
                self.framework,
                changed,
                batch["input_ids"].shape[0],
            )
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.collator, name)
