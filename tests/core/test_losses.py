"""Loss variants against closed-form values (the LLaMA-Factory pref_loss hand check: log-ratio 1.5, beta 0.1)."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import PreferenceLogps


def pairs(margins, dtype=torch.float32, requires_grad=False):
    chosen = torch.tensor(margins, dtype=dtype, requires_grad=requires_grad)
    zeros = torch.zeros(len(margins), dtype=dtype)
    return PreferenceLogps(chosen=chosen, rejected=zeros, ref_chosen=zeros, ref_rejected=zeros)


def compute(loss_type, logps, **loss_options):
    manager = create_plugin_manager(load_entry_points=False)
    config = manager.load_config({"loss": {"type": loss_type, "beta": 0.1, **loss_options}})
    return manager.hook.vlm_dpo_compute_loss(logps=logps, config=config)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("sigmoid", -math.log(1 / (1 + math.exp(-0.15)))),  # 0.6210
        ("hinge", 1 - 0.15),  # 0.8500
        ("ipo", (1.5 - 1 / (2 * 0.1)) ** 2),  # 12.25
    ],
)
def test_closed_form_values(loss_type, expected):
    output = compute(loss_type, pairs([1.5]))
    assert float(output.losses[0]) == pytest.approx(expected, rel=1e-6)
    assert float(output.chosen_rewards[0]) == pytest.approx(0.15)
    assert float(output.rejected_rewards[0]) == 0.0


def test_sigmoid_is_ln2_at_zero_margin_and_smoothing_mixes_both_directions():
    assert float(compute("sigmoid", pairs([0.0])).losses[0]) == pytest.approx(math.log(2))
    smoothed = float(compute("sigmoid", pairs([1.5]), label_smoothing=0.2).losses[0])
    expected = 0.8 * -math.log(1 / (1 + math.exp(-0.15))) + 0.2 * -math.log(1 / (1 + math.exp(0.15)))
    assert smoothed == pytest.approx(expected, rel=1e-6)


def test_gradient_matches_the_analytic_derivative():
    logps = pairs([1.5, -0.5], requires_grad=True)
    compute("sigmoid", logps).losses.sum().backward()
    # d/dx -log sigmoid(beta x) = -beta * sigmoid(-beta x)
    expected = [-0.1 / (1 + math.exp(0.1 * m)) for m in (1.5, -0.5)]
    assert logps.chosen.grad.tolist() == pytest.approx(expected, rel=1e-5)


def test_bf16_log_probs_are_promoted_to_fp32():
    # Summed log-probs of long responses are large; their bf16 difference loses the margin entirely.
    chosen, rejected = torch.tensor([-1000.0]), torch.tensor([-1000.0])
    logps = PreferenceLogps(
        chosen=(chosen + 0.3).bfloat16(), rejected=rejected.bfloat16(),
        ref_chosen=chosen.bfloat16(), ref_rejected=(rejected + 0.2).bfloat16(),
    )
    output = compute("sigmoid", logps)
    assert output.losses.dtype == torch.float32
    kept_bf16 = compute("sigmoid", logps, fp32_logps=False)
    assert kept_bf16.losses.dtype == torch.bfloat16
