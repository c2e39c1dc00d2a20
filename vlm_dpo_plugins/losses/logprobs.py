"""Summed log-probs of response tokens, computed in fp32 a chunk of tokens at a time.

Why: the log-softmax of bf16 logits in bf16 loses the small differences DPO is made of, while upcasting
the whole ``[rows, T, V]`` logits to fp32 costs ``rows * T * V * 4`` bytes twice over (the copy and the
log-softmax saved for backward), e.g. 1 GiB for 2 x 2048 x 32000. Here only the positions that score a
response token are upcast, ``chunk_tokens`` of them at a time, and the backward recomputes each chunk's
softmax instead of keeping it, so fp32 memory stays at a few chunks whatever the sequence length.

Label shift: the logits at position ``t`` predict token ``t + 1``. Pass the *unshifted* ``input_ids``
(or labels; ids outside the mask are never read, so ``-100`` there is fine) and a ``response_mask``
aligned with them, 1 on the response tokens to score. Token ``t`` (``t >= 1``) is scored by
``logits[:, t - 1]``; a 1 at position 0 is an error because nothing predicts the first token.

``sequence_logps_from_hidden`` takes the final hidden states and the ``lm_head`` weight instead, so
not even the bf16 logits of the whole sequence exist; use it only for a plain linear head without bias,
logit scaling or soft-capping (Gemma 2/3, Cohere and Granite change the logits; use ``sequence_logps``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from vlm_dpo_plugins.types import PreferenceLogps

CHUNK_ELEMENTS = 2**24
"""fp32 elements per chunk by default (64 MiB): ~500 tokens of a 32k vocabulary, ~110 of a 152k one."""


@dataclass(frozen=True)
class SequenceLogps:
    """Per row: the summed log-prob of its response tokens (fp32 or wider) and how many tokens were summed."""

    logps: torch.Tensor
    token_counts: torch.Tensor


def default_chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor, *, chunk_tokens: int | None = None
) -> SequenceLogps:
    """Summed fp32 log-probs of the response tokens from ``[rows, T, V]`` logits in any float dtype."""
    dense, counts = _dense_token_logps(logits, input_ids, response_mask, chunk_tokens)
    return SequenceLogps(dense.sum(dim=-1), counts)


def token_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor, *, chunk_tokens: int | None = None
) -> torch.Tensor:
    """``[rows, T]`` fp32: at ``t - 1`` the log-prob of response token ``t`` (as the logits score it), 0 elsewhere.

    For callers that sum the tokens of one row into several sequences (packed preference pairs).
    """
    return _dense_token_logps(logits, input_ids, response_mask, chunk_tokens)[0]


def _dense_token_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor, chunk_tokens: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, length, vocab_size = logits.shape
    positions, targets, counts = _scored_tokens(input_ids, response_mask, vocab_size, logits.shape[:2])
    chunk = chunk_tokens or default_chunk_tokens(vocab_size)
    scored = _TargetLogpsFromLogits.apply(logits.flatten(0, 1), positions, targets, chunk)
    return _dense(scored, positions, rows, length), counts


def sequence_logps_from_hidden(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    chunk_tokens: int | None = None,
) -> SequenceLogps:
    """As ``sequence_logps`` from ``[rows, T, H]`` final hidden states and the ``[V, H]`` lm_head weight."""
    rows, length, hidden_size = hidden_states.shape
    vocab_size = lm_head_weight.shape[0]
    if lm_head_weight.shape[1] != hidden_size:
        raise ValueError(
            f"lm_head_weight has shape {tuple(lm_head_weight.shape)}; expected [vocab, {hidden_size}] to match "
            f"hidden_states {tuple(hidden_states.shape)}"
        )
    positions, targets, counts = _scored_tokens(input_ids, response_mask, vocab_size, hidden_states.shape[:2])
    chunk = chunk_tokens or default_chunk_tokens(vocab_size)
    flat_hidden = hidden_states.flatten(0, 1).to(lm_head_weight.dtype)
    token_logps = _TargetLogpsFromHidden.apply(flat_hidden, lm_head_weight, positions, targets, chunk)
    return SequenceLogps(_sum_per_row(token_logps, positions, rows, length), counts)


def preference_logps(
    policy: SequenceLogps,
    reference: SequenceLogps | None = None,
    extras: dict[str, torch.Tensor] | None = None,
) -> PreferenceLogps:
    """Pairs from 2B rows laid out as every framework collates them: all chosen rows, then all rejected rows."""
    if policy.logps.shape[0] % 2:
        raise ValueError(
            f"expected 2B rows (B chosen, then B rejected), got {policy.logps.shape[0]}: "
            "compute the log-probs over the whole concatenated preference batch"
        )
    chosen, rejected = policy.logps.chunk(2)
    chosen_count, rejected_count = policy.token_counts.chunk(2)
    ref_chosen, ref_rejected = reference.logps.chunk(2) if reference is not None else (None, None)
    return PreferenceLogps(
        chosen=chosen,
        rejected=rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_token_count=chosen_count,
        rejected_token_count=rejected_count,
        extras=dict(extras or {}),
    )


def _scored_tokens(
    input_ids: torch.Tensor, response_mask: torch.Tensor, vocab_size: int, leading_shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices of the logits that score a response token, those tokens' ids, and tokens per row."""
    if input_ids.shape != leading_shape or response_mask.shape != leading_shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and response_mask {tuple(response_mask.shape)} must both have "
            f"the logits' leading shape {tuple(leading_shape)} (unshifted: logits at t predict token t + 1)"
        )
    mask = response_mask.to(device=input_ids.device).bool()
    row, position = mask.nonzero(as_tuple=True)
    targets = input_ids[row, position]
    unscorable = (position == 0) | (targets < 0) | (targets >= vocab_size)
    if bool(unscorable.any()):
        index = int(unscorable.nonzero()[0, 0])
        bad_row, bad_position, token = int(row[index]), int(position[index]), int(targets[index])
        reason = (
            "nothing predicts the first token; a response must follow at least one prompt token"
            if bad_position == 0
            else f"token id {token} is outside the vocabulary [0, {vocab_size}) (an ignore index under the mask?)"
        )
        raise ValueError(f"response_mask is 1 at row {bad_row}, position {bad_position}: {reason}")
    length = leading_shape[1]
    logit_positions = row * length + position - 1
    counts = mask[:, 1:].sum(dim=-1)
    return logit_positions, targets, counts


def _sum_per_row(token_logps: torch.Tensor, positions: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    return _dense(token_logps, positions, rows, length).sum(dim=-1)


def _dense(token_logps: torch.Tensor, positions: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    # A dense [rows, T] grid: each position is written once, so unlike index_add (atomics on CUDA) a per-row
    # sum over it has the same order, and value, on every run.
    return token_logps.new_zeros(rows * length).index_put((positions,), token_logps).view(rows, length)


def _exp_shifted_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite a chunk with exp(logits - rowmax), returning it and the row maxima; no second chunk-sized buffer."""
    peak = logits.amax(dim=-1, keepdim=True)
    return logits.sub_(peak).exp_(), peak.squeeze(-1)


def _log_softmax_at_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[target] per row; consumes ``logits`` (a chunk this module owns)."""
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    exponentials, peak = _exp_shifted_(logits)
    return picked - peak - exponentials.sum(dim=-1).log()


def _log_softmax_gradient_(logits: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d(sum_i grad_i * log_softmax(logits_i)[target_i]) / d logits = grad * (one_hot(target) - softmax), in place."""
    exponentials, _ = _exp_shifted_(logits)
    probabilities = exponentials.div_(exponentials.sum(dim=-1, keepdim=True))
    return probabilities.mul_(-grad[:, None]).scatter_add_(1, targets[:, None], grad[:, None])


def _chunks(count: int, size: int):
    return (slice(start, start + size) for start in range(0, count, size))


class _TargetLogpsFromLogits(torch.autograd.Function):
    """log_softmax(logits[p])[target] for each scored flat position p, fp32 a chunk at a time, both ways."""

    @staticmethod
    def forward(ctx, flat_logits, positions, targets, chunk_tokens):
        dtype = torch.promote_types(flat_logits.dtype, torch.float32)
        token_logps = torch.empty(positions.shape[0], dtype=dtype, device=flat_logits.device)
        for part in _chunks(positions.shape[0], chunk_tokens):
            chunk = flat_logits.index_select(0, positions[part]).to(dtype)
            token_logps[part] = _log_softmax_at_(chunk, targets[part])
        ctx.save_for_backward(flat_logits, positions, targets)
        ctx.chunk_tokens = chunk_tokens
        return token_logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_token_logps):
        flat_logits, positions, targets = ctx.saved_tensors
        grad_logits = torch.zeros_like(flat_logits)
        for part in _chunks(positions.shape[0], ctx.chunk_tokens):
            chunk = flat_logits.index_select(0, positions[part]).to(grad_token_logps.dtype)
            grad = _log_softmax_gradient_(chunk, targets[part], grad_token_logps[part])
            grad_logits.index_copy_(0, positions[part], grad.to(grad_logits.dtype))
        return grad_logits, None, None, None


class _TargetLogpsFromHidden(torch.autograd.Function):
    """As _TargetLogpsFromLogits, computing each chunk's logits ``hidden @ weight.T`` when needed."""

    @staticmethod
    def forward(ctx, flat_hidden, weight, positions, targets, chunk_tokens):
        dtype = torch.promote_types(weight.dtype, torch.float32)
        token_logps = torch.empty(positions.shape[0], dtype=dtype, device=flat_hidden.device)
        for part in _chunks(positions.shape[0], chunk_tokens):
            logits = (flat_hidden.index_select(0, positions[part]) @ weight.T).to(dtype)
            token_logps[part] = _log_softmax_at_(logits, targets[part])
        ctx.save_for_backward(flat_hidden, weight, positions, targets)
        ctx.chunk_tokens = chunk_tokens
        return token_logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_token_logps):
        flat_hidden, weight, positions, targets = ctx.saved_tensors
        wants_hidden, wants_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(flat_hidden) if wants_hidden else None
        # Summed over chunks in fp32: adding many bf16 partial products in bf16 would drop the small ones.
        grad_weight = torch.zeros_like(weight, dtype=grad_token_logps.dtype) if wants_weight else None
        for part in _chunks(positions.shape[0], ctx.chunk_tokens):
            hidden = flat_hidden.index_select(0, positions[part])
            logits = (hidden @ weight.T).to(grad_token_logps.dtype)
            grad_logits = _log_softmax_gradient_(logits, targets[part], grad_token_logps[part]).to(weight.dtype)
            if wants_hidden:
                grad_hidden.index_copy_(0, positions[part], grad_logits @ weight)
            if wants_weight:
                grad_weight += grad_logits.T @ hidden
        if wants_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None
