"""The chunked log-prob helper against a plain-PyTorch fp32 reference (log_softmax + gather).

Tolerances. Against the reference on the *same* logits (upcast to fp32): the helper does the same fp32
arithmetic in another order, so 1e-5 relative for every input dtype. Against the fp32 reference on the
*original* fp32 logits, the low-precision copy has moved each logit by at most u * |logit| (unit roundoff
u = 2^-8 for bf16, 2^-11 for fp16); log_softmax(x)[t] = x_t - logsumexp(x) moves by at most twice the largest
logit change, so a row's sum may move by at most 2 * u * max|logit| per scored token.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vlm_dpo_plugins.losses.logprobs import (
    SequenceLogps,
    default_chunk_tokens,
    preference_logps,
    sequence_logps,
    sequence_logps_from_hidden,
)

UNIT_ROUNDOFF = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}
ROWS, LENGTH, VOCAB, HIDDEN = 4, 12, 50, 16


def reference_logps(logits, input_ids, response_mask):
    """Plain fp32: log_softmax over the whole vocabulary, logits at t scoring token t + 1, masked sum."""
    log_probs = logits.float().log_softmax(dim=-1)[:, :-1]
    targets = input_ids[:, 1:].clamp(min=0)  # -100 outside the mask; those positions are multiplied by 0
    token_logps = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = response_mask[:, 1:].float()
    return (token_logps * mask).sum(dim=-1), mask.sum(dim=-1).long()


def batch():
    """Four rows: right padding, left padding, a long response, and a row whose response was truncated away."""
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(ROWS, LENGTH, VOCAB, generator=generator)
    input_ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=generator)
    mask = torch.zeros(ROWS, LENGTH, dtype=torch.long)
    mask[0, 4:9] = 1  # prompt 0-3, response 4-8, right padding 9-11
    mask[1, 7:] = 1  # left padding 0-2, prompt 3-6, response 7-11
    mask[2, 1:] = 1  # one prompt token (BOS), response to the end
    input_ids[0, 9:] = -100  # labels-style ignore index on padding: never read
    input_ids[1, :3] = -100
    # A position whose vocabulary is masked to -inf except the next token (log-prob exactly 0), as constrained
    # decoding heads produce: the row maximum must not turn into inf - inf = NaN.
    logits[2, 3] = float("-inf")
    logits[2, 3, input_ids[2, 4]] = 0.0
    return logits, input_ids, mask  # row 3: mask all zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_matches_the_fp32_reference_on_the_same_logits(dtype):
    logits, input_ids, mask = batch()
    logits = logits.to(dtype)
    result = sequence_logps(logits, input_ids, mask, chunk_tokens=3)  # 3 does not divide 5 + 5 + 11 tokens
    expected, counts = reference_logps(logits, input_ids, mask)
    assert result.logps.dtype == torch.float32
    assert result.token_counts.tolist() == counts.tolist() == [5, 5, 11, 0]
    assert result.logps.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert float(result.logps[3]) == 0.0
    assert result.logps.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_logits_stay_within_their_rounding_bound(dtype):
    logits, input_ids, mask = batch()
    exact, counts = reference_logps(logits, input_ids, mask)
    result = sequence_logps(logits.to(dtype), input_ids, mask)
    bounds = 2 * UNIT_ROUNDOFF[dtype] * logits[logits.isfinite()].abs().max() * counts
    assert ((result.logps - exact).abs() <= bounds).all()
    assert ((result.logps - exact).abs() > 0).any()  # the rounding is real, so the bound is doing work


def test_label_shift_logits_at_t_score_token_t_plus_1():
    # log_softmax(log p) = log p when p sums to 1, so each position's distribution is written out directly.
    p = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3], [0.25, 0.25, 0.5]])
    logits = p.log().unsqueeze(0)
    input_ids = torch.tensor([[0, 2, 1]])
    mask = torch.tensor([[0, 1, 1]])
    result = sequence_logps(logits, input_ids, mask)
    # token 1 (id 2) is scored by position 0: log 0.5; token 2 (id 1) by position 1: log 0.1
    assert float(result.logps[0]) == pytest.approx(math.log(0.5) + math.log(0.1), rel=1e-6)
    assert result.token_counts.tolist() == [2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gradient_matches_autograd_through_the_reference(dtype):
    logits, input_ids, mask = batch()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # distinct per row, so a row mix-up shows
    ours = logits.to(dtype).requires_grad_()
    (sequence_logps(ours, input_ids, mask, chunk_tokens=4).logps * weights).sum().backward()
    theirs = logits.to(dtype).requires_grad_()
    (reference_logps(theirs, input_ids, mask)[0] * weights).sum().backward()
    assert ours.grad.dtype == dtype
    # d/dlogit of a weighted log-prob is weight * (one_hot - softmax), |.| <= 3: one rounding to the dtype.
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=3 * 2 * UNIT_ROUNDOFF[dtype] + 1e-6)
    assert (ours.grad[3] == 0).all() and (ours.grad[0, 8:] == 0).all()  # masked rows and positions get none


def test_backward_passes_gradcheck_in_float64():
    logits, input_ids, mask = batch()
    logits = logits[:2, :8].double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: sequence_logps(x, input_ids[:2, :8], mask[:2, :8], chunk_tokens=2).logps, (logits,)
    )


def hidden_batch(dtype):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(ROWS, LENGTH, HIDDEN, generator=generator).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5).to(dtype)
    _, input_ids, mask = batch()
    return hidden, weight, input_ids, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hidden_state_variant_equals_the_helper_on_the_model_logits(dtype):
    hidden, weight, input_ids, mask = hidden_batch(dtype)
    logits = hidden @ weight.T  # what the lm_head computes, in the same dtype
    from_logits = sequence_logps(logits, input_ids, mask)
    from_hidden = sequence_logps_from_hidden(hidden, weight, input_ids, mask, chunk_tokens=3)
    assert from_hidden.token_counts.tolist() == from_logits.token_counts.tolist()
    if dtype == torch.float32:
        assert from_hidden.logps.tolist() == pytest.approx(from_logits.logps.tolist(), rel=1e-5)
    else:
        # A chunk's bf16 matmul may round each logit to the other neighbour of the full matmul's result.
        bounds = 2 * 2 * UNIT_ROUNDOFF[dtype] * logits.float().abs().max() * from_logits.token_counts + 1e-5
        assert ((from_hidden.logps - from_logits.logps).abs() <= bounds).all()


def test_hidden_state_variant_gradients_match_autograd_and_gradcheck():
    hidden, weight, input_ids, mask = hidden_batch(torch.float32)
    hidden.requires_grad_(), weight.requires_grad_()
    row_weights = torch.arange(1.0, 5.0)
    (sequence_logps_from_hidden(hidden, weight, input_ids, mask, chunk_tokens=4).logps * row_weights).sum().backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    (reference_logps(h2 @ w2.T, input_ids, mask)[0] * row_weights).sum().backward()
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-5, atol=1e-6)
    small = [t[:2, :6] for t in (hidden.detach().double(), input_ids, mask)]
    h64, w64 = small[0].requires_grad_(), weight.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: sequence_logps_from_hidden(h, w, small[1], small[2], chunk_tokens=2).logps, (h64, w64)
    )


def test_frozen_lm_head_gets_no_gradient_buffer():
    hidden, weight, input_ids, mask = hidden_batch(torch.float32)
    hidden.requires_grad_()
    sequence_logps_from_hidden(hidden, weight, input_ids, mask).logps.sum().backward()
    assert hidden.grad is not None and weight.grad is None


class LargestTensors(TorchDispatchMode):
    """Records the largest tensor every op produces, overall and in fp32."""

    def __init__(self):
        super().__init__()
        self.largest = self.largest_fp32 = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
                if tensor.dtype == torch.float32:
                    self.largest_fp32 = max(self.largest_fp32, tensor.numel())
        return out


def test_no_full_fp32_copy_of_the_logits_forward_or_backward():
    rows, length, vocab, chunk = 2, 64, 1000, 16
    logits = torch.randn(rows, length, vocab).bfloat16().requires_grad_()
    input_ids = torch.randint(0, vocab, (rows, length))
    mask = torch.zeros(rows, length, dtype=torch.long)
    mask[:, 20:] = 1
    with LargestTensors() as helper:
        sequence_logps(logits, input_ids, mask, chunk_tokens=chunk).logps.sum().backward()
    assert helper.largest_fp32 <= chunk * vocab
    with LargestTensors() as naive:  # the probe sees the full copy when there is one
        reference_logps(logits, input_ids, mask)[0].sum().backward()
    assert naive.largest_fp32 >= rows * (length - 1) * vocab


def test_hidden_state_variant_never_builds_the_logits():
    rows, length, vocab, hidden_size, chunk = 2, 64, 1000, 16, 16
    hidden = torch.randn(rows, length, hidden_size).bfloat16().requires_grad_()
    weight = torch.randn(vocab, hidden_size).bfloat16().requires_grad_()
    input_ids = torch.randint(0, vocab, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[:, 0] = 0
    with LargestTensors() as probe:
        sequence_logps_from_hidden(hidden, weight, input_ids, mask, chunk_tokens=chunk).logps.sum().backward()
    assert probe.largest <= max(chunk * vocab, vocab * hidden_size)  # a chunk of logits, or the weight's gradient
    assert probe.largest < rows * length * vocab / 4


def test_default_chunk_is_64_mib_of_fp32():
    assert default_chunk_tokens(32000) == 524 and default_chunk_tokens(152064) == 110
    assert default_chunk_tokens(2**30) == 1


@pytest.mark.parametrize(
    "position, token, message",
    [
        (0, 5, "response_mask is 1 at row 1, position 0: nothing predicts the first token"),
        (3, -100, "response_mask is 1 at row 1, position 3: token id -100 is outside the vocabulary [0, 50)"),
        (3, 50, "token id 50 is outside the vocabulary [0, 50)"),
    ],
)
def test_unscorable_tokens_under_the_mask_are_refused_with_row_and_position(position, token, message):
    logits, input_ids, mask = batch()
    mask[1, position], input_ids[1, position] = 1, token
    with pytest.raises(ValueError) as error:
        sequence_logps(logits, input_ids, mask)
    assert message in str(error.value)


def test_shape_mismatch_is_refused():
    logits, input_ids, mask = batch()
    with pytest.raises(ValueError, match=r"must both have the logits' leading shape \(4, 12\)"):
        sequence_logps(logits, input_ids[:, 1:], mask[:, 1:])


def test_preference_logps_splits_chosen_rows_then_rejected_rows():
    policy = SequenceLogps(torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([1, 2, 3, 4]))
    reference = SequenceLogps(torch.tensor([-1.5, -2.5, -3.5, -4.5]), torch.tensor([1, 2, 3, 4]))
    pairs = preference_logps(policy, reference)
    assert pairs.chosen.tolist() == [-1.0, -2.0] and pairs.rejected.tolist() == [-3.0, -4.0]
    assert pairs.ref_chosen.tolist() == [-1.5, -2.5] and pairs.ref_rejected.tolist() == [-3.5, -4.5]
    assert pairs.chosen_token_count.tolist() == [1, 2] and pairs.rejected_token_count.tolist() == [3, 4]
    assert preference_logps(policy).ref_chosen is None
    with pytest.raises(ValueError, match=r"expected 2B rows \(B chosen, then B rejected\), got 3"):
        preference_logps(SequenceLogps(torch.zeros(3), torch.ones(3)))
