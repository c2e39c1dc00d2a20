"""Log-probs and logit metrics per collated row, from logits over the rows the model actually ran.

For adapters whose framework returns logits (LLaMA-Factory, ms-swift): the loss and the metrics
keep reading two rows per pair, chosen first, whether the pairs ran packed or not.
"""

from __future__ import annotations

import torch

from vlm_dpo_plugins.losses.logprobs import SequenceLogps, sequence_logps, token_logps
from vlm_dpo_plugins.sharing.forward import PreparedBatch
from vlm_dpo_plugins.sharing.packing import CHOSEN, REJECTED, SHARED

IGNORE_INDEX = -100


def collated_sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, prepared: PreparedBatch, ignore_index: int = IGNORE_INDEX
) -> SequenceLogps:
    """Summed fp32 response log-probs of the 2B collated rows; ``labels`` in the layout the model ran."""
    scored = labels != ignore_index
    if prepared.packed is None:
        return sequence_logps(logits, labels, scored)
    # One pass over the scored positions of both responses: the logits' gradient buffer is built once.
    per_token = token_logps(logits, labels, scored)
    side = prepared.packed.side[:, 1:]
    sums, counts = [], []
    for wanted in (CHOSEN, REJECTED):
        mask = scored[:, 1:] & (side == wanted)
        sums.append((per_token[:, :-1] * mask).sum(dim=-1))
        counts.append(mask.sum(dim=-1))
    return SequenceLogps(torch.cat(sums), torch.cat(counts))


def row_logit_means(logits: torch.Tensor, prepared: PreparedBatch, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean logit over the chosen rows and over the rejected rows (LLaMA-Factory's ``logits/*``).

    Packed, a chosen row is the shared prompt and the chosen branch, a rejected row the shared prompt and the
    rejected branch; padding, which the two-row layout averages in, is left out.
    """
    if prepared.packed is None:
        return logits[:pairs].detach().mean(dtype=torch.float32), logits[pairs:].detach().mean(dtype=torch.float32)
    side = prepared.packed.side
    return tuple(
        logits.detach()[(side == SHARED) | (side == wanted)].mean(dtype=torch.float32) for wanted in (CHOSEN, REJECTED)
    )


def response_logit_means(
    logits: torch.Tensor, labels: torch.Tensor, prepared: PreparedBatch, pairs: int, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over each side's response tokens of the mean logit that predicts the token (ms-swift's ``logits/*``:
    it shifts the labels left, so a response token's logits are those of the position before it)."""
    mean_logits = logits.detach().float().mean(-1)[:, :-1]
    response = (labels != ignore_index)[:, 1:]
    if prepared.packed is None:
        return mean_logits[:pairs][response[:pairs]].mean(), mean_logits[pairs:][response[pairs:]].mean()
    side = prepared.packed.side[:, 1:]
    return tuple(mean_logits[response & (side == wanted)].mean() for wanted in (CHOSEN, REJECTED))
