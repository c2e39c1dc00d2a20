"""Packed pairs' attention from two causal kernel calls per row, against SDPA with the dense mask it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from vlm_dpo_plugins.sharing.packing import CHOSEN, REJECTED, SHARED, pack_pairs
from vlm_dpo_plugins.sharing.prefix_attention import (
    LAYOUT_KEYWORD,
    PairLayout,
    _dispatcher,
    pair_attention,
)


def packed_batch():
    """Three pairs, right-padded rows of different prompt and response lengths: packed rows pad too."""
    # (prompt, chosen, rejected) lengths per pair
    lengths = [(5, 3, 6), (2, 4, 1), (7, 2, 2)]
    pairs, width = len(lengths), max(p + max(c, r) for p, c, r in lengths)
    input_ids = torch.zeros((2 * pairs, width), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    response = torch.zeros_like(input_ids)
    generator = torch.Generator().manual_seed(0)
    for pair, (prompt, chosen, rejected) in enumerate(lengths):
        prompt_ids = torch.randint(5, 50, (prompt,), generator=generator)
        for row, response_length in ((pair, chosen), (pair + pairs, rejected)):
            input_ids[row, :prompt] = prompt_ids
            input_ids[row, prompt : prompt + response_length] = torch.randint(5, 50, (response_length,))
            attention[row, : prompt + response_length] = 1
            response[row, prompt : prompt + response_length] = 1
    return pack_pairs(input_ids, attention, response)


def projections(packed, heads=4, key_heads=2, dim=8, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    shape = (packed.pairs, heads, packed.length, dim)
    query = torch.randn(shape, generator=generator, dtype=dtype).requires_grad_()
    key = torch.randn((packed.pairs, key_heads, packed.length, dim), generator=generator, dtype=dtype)
    value = torch.randn((packed.pairs, key_heads, packed.length, dim), generator=generator, dtype=dtype)
    return query, key.requires_grad_(), value.requires_grad_()


def dense_reference(query, key, value, packed):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=packed.visible())
    return out.transpose(1, 2).masked_fill(~packed.token_mask[:, :, None, None], 0)


def test_the_layout_counts_each_part_of_each_packed_row():
    packed = packed_batch()
    layout = PairLayout.of(packed.side, SHARED, CHOSEN, REJECTED)
    # shared: the prompt but its last token; chosen and rejected: that token (or its copy) and the response
    assert layout.shared == (4, 1, 6)
    assert layout.chosen == (4, 5, 3)
    assert layout.rejected == (7, 2, 3)
    assert layout.length == packed.length == max(s + c + r for s, c, r in zip(layout.shared, layout.chosen,
                                                                                  layout.rejected))  # fmt: skip


def test_two_causal_calls_per_row_equal_the_dense_mask_forward_and_backward():
    packed = packed_batch()
    layout = PairLayout.of(packed.side, SHARED, CHOSEN, REJECTED)
    query, key, value = projections(packed)
    ours = pair_attention(query, key, value, layout)
    reference = dense_reference(query, key, value, packed)
    assert ours.shape == reference.shape == (packed.pairs, packed.length, 4, 8)
    assert torch.allclose(ours, reference, atol=1e-6, rtol=0)
    upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2))
    gradients = torch.autograd.grad((ours * upstream).sum(), (query, key, value))
    reference_gradients = torch.autograd.grad((reference * upstream).sum(), (query, key, value))
    for name, ours_grad, reference_grad in zip("qkv", gradients, reference_gradients):
        # Gradients of magnitude ~5 summed over rows: equal to fp32 rounding (measured ~1e-6).
        assert torch.allclose(ours_grad, reference_grad, atol=1e-5, rtol=0), name


def test_bf16_matches_the_dense_mask_to_bf16_rounding():
    packed = packed_batch()
    layout = PairLayout.of(packed.side, SHARED, CHOSEN, REJECTED)
    query, key, value = projections(packed, dtype=torch.bfloat16)
    ours = pair_attention(query, key, value, layout).float()
    reference = dense_reference(query, key, value, packed).float()
    assert torch.allclose(ours, reference, atol=2e-2, rtol=2e-2)


class SquareTensors(TorchFunctionMode):
    """Every tensor a torch function returns whose last two dimensions are ``length`` x ``length``."""

    def __init__(self, length):
        super().__init__()
        self.length, self.found = length, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.ndim >= 2 and tensor.shape[-2:] == (self.length,) * 2:
                self.found.append((str(func), tuple(tensor.shape)))
        return out


def test_no_square_mask_of_the_packed_length_is_built():
    packed = packed_batch()
    layout = PairLayout.of(packed.side, SHARED, CHOSEN, REJECTED)
    query, key, value = projections(packed)
    with SquareTensors(packed.length) as probe:
        pair_attention(query, key, value, layout).sum().backward()
    assert probe.found == []
    # The probe sees the dense path's mask and scores: it would have caught one.
    with SquareTensors(packed.length) as probe:
        dense_reference(query, key, value, packed)
    assert probe.found


class Attention(torch.nn.Module):
    def __init__(self, is_causal):
        super().__init__()
        self.is_causal = is_causal


def test_the_dispatcher_computes_only_causal_calls_over_the_packed_rows():
    packed = packed_batch()
    layout = PairLayout.of(packed.side, SHARED, CHOSEN, REJECTED)
    query, key, value = projections(packed, key_heads=4)
    stock_calls = []

    def stock(module, query, key, value, attention_mask, **kwargs):
        stock_calls.append(sorted(kwargs))
        return "stock", None

    attention = _dispatcher(stock)
    text = Attention(is_causal=True)
    output, weights = attention(text, query, key, value, None, scaling=None, **{LAYOUT_KEYWORD: layout})
    assert weights is None and output.shape == (packed.pairs, packed.length, 4, 8) and layout.dispatched == 1
    # A vision tower's attention (not causal) gets the same keyword arguments: it runs the user's function, without
    # the layout.
    assert attention(Attention(is_causal=False), query, key, value, None, dropout=0.0, **{LAYOUT_KEYWORD: layout}) == (
        "stock", None
    )  # fmt: skip
    assert attention(text, query, key, value, None) == ("stock", None)
    assert stock_calls == [["dropout"], []]
    assert layout.dispatched == 1


def test_a_call_that_does_not_match_its_layout_is_refused_naming_the_way_out():
    packed = packed_batch()
    layout = PairLayout.of(packed.side, SHARED, CHOSEN, REJECTED)
    query, key, value = projections(packed, key_heads=4)
    attention = _dispatcher(lambda *args, **kwargs: None)
    with pytest.raises(RuntimeError, match="sharing.attention: dense avoids it"):
        attention(Attention(True), query[:1], key[:1], value[:1], None, **{LAYOUT_KEYWORD: layout})
    with pytest.raises(RuntimeError, match="sliding window 3"):
        attention(Attention(True), query, key, value, None, sliding_window=3, **{LAYOUT_KEYWORD: layout})
    # A window shorter than the packed row but covering every branch, prompt included, sees what two rows see.
    assert layout.longest_branch < layout.length
    output, _ = attention(
        Attention(True), query, key, value, None, sliding_window=layout.longest_branch, **{LAYOUT_KEYWORD: layout}
    )
    assert output.shape[1] == layout.length


def test_under_autocast_mixed_input_dtypes_are_cast_as_sdpa_would_be():
    # bf16 autocast hands the attention fp32 queries (rotary in fp32) and bf16 values; stock SDPA is autocast to
    # bf16, the lower-right causal bias bypasses autocast and would refuse mixed dtypes.
    packed = packed_batch()
    layout = PairLayout.of(packed.side, SHARED, CHOSEN, REJECTED)
    query, key, value = projections(packed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = pair_attention(query, key, value.bfloat16(), layout)
        reference = dense_reference(query, key, value.bfloat16(), packed)
    assert ours.dtype == reference.dtype == torch.bfloat16
    assert torch.allclose(ours.float(), reference.float(), atol=2e-2, rtol=2e-2)
