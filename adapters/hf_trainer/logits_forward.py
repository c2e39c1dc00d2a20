"""The forward of a framework whose model returns logits (LLaMA-Factory, ms-swift): summed fp32 response log-probs."""

from __future__ import annotations

from typing import Any

import torch

from vlm_dpo_plugins.losses.logprobs import SequenceLogps
from vlm_dpo_plugins.sharing.forward import PreparedBatch
from vlm_dpo_plugins.sharing.logits import collated_sequence_logps


def logits_forward(model: Any, prepared: PreparedBatch, ignore_index: int) -> tuple[SequenceLogps, torch.Tensor]:
    """The collated rows' summed log-probs (labels outside the responses are ``ignore_index``), and the logits."""
    logits = model(**prepared.kwargs, return_dict=True, use_cache=False).logits
    length = prepared.labels.shape[1]
    if logits.shape[1] != length:
        # Some models return logits for image tokens placed before the text; the text's are the last positions.
        logits = logits[:, -length:]
    return collated_sequence_logps(logits, prepared.labels, prepared, ignore_index), logits
