"""Loss variants against closed forms written out by hand: values, rewards and gradients, for fp32 and bf16 inputs.

Two pairs, summed log-probs (c = chosen, r = rejected, rc/rr = reference, cc/rcc = chosen under a corrupted
image, policy/reference), token counts nc/nr:

    pair 0: c -12.3  r -15.1  rc -13.2  rr -14.6  cc -14.0  rcc -13.7  nc 4  nr 5
    pair 1: c -20.7  r -18.2  rc -20.1  rr -18.9  cc -20.9  rcc -20.2  nc 6  nr 3

so chosen_ratio = c - rc = [0.9, -0.6], rejected_ratio = r - rr = [-0.5, 0.7], the margin
h = [1.4, -1.3], corrupted_ratio = cc - rcc = [-0.3, -0.7].

Tolerances. bf16 keeps 8 significant bits, so -12.3 is stored as -12.3125. The closed forms are therefore
evaluated at the values the input dtype actually holds (for fp32 that is -12.3 within 6e-8 relative).
Losses: rel 1e-5 for both dtypes, because the loss is computed in fp32 from the upcast inputs; a loss computed
in bf16 is off by 1e-3 to 3e-2 relative here (measured) and would fail. Gradients: rel 1e-5 for fp32 inputs,
rel 2^-8 for bf16 inputs, because autograd returns the gradient of a bf16 leaf in bf16 (one rounding to 8
significant bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from vlm_dpo_plugins.errors import ConfigError, PluginError
from vlm_dpo_plugins.losses.logprobs import SequenceLogps
from vlm_dpo_plugins.losses.extra_rows import split_extras
from vlm_dpo_plugins.losses.mdpo import CORRUPTED_CHOSEN, CORRUPTED_IMAGE_ROWS, REF_CORRUPTED_CHOSEN
from vlm_dpo_plugins.losses.mpo import RewardBaseline
from vlm_dpo_plugins.losses.registry import BUILTIN_LOSS_INPUTS, builtin_losses
from vlm_dpo_plugins.losses.settings import BUILTIN_LOSS_TYPES, LossConfig
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import LossInputs, PreferenceLogps, StepSignals

INPUTS = {
    "chosen": [-12.3, -20.7],
    "rejected": [-15.1, -18.2],
    "ref_chosen": [-13.2, -20.1],
    "ref_rejected": [-14.6, -18.9],
    CORRUPTED_CHOSEN: [-14.0, -20.9],
    REF_CORRUPTED_CHOSEN: [-13.7, -20.2],
}
COUNTS = {"chosen_token_count": [4, 6], "rejected_token_count": [5, 3]}


@dataclass
class Pair:
    c: float
    r: float
    rc: float
    rr: float
    cc: float
    rcc: float
    nc: int
    nr: int


PAIRS = [
    Pair(*(INPUTS[key][i] for key in INPUTS), COUNTS["chosen_token_count"][i], COUNTS["rejected_token_count"][i])
    for i in range(2)
]


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def softplus(z):  # -log sigmoid(-z)
    return math.log1p(math.exp(z))


# -- closed forms: each returns (loss, d loss / d c, d loss / d r) for one pair -------------------------------


def dpo(p, beta=0.1, eps=0.0):
    # loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); dh/dc = 1, dh/dr = -1
    h = (p.c - p.rc) - (p.r - p.rr)
    loss = (1 - eps) * softplus(-beta * h) + eps * softplus(beta * h)
    dh = -(1 - eps) * beta * sigmoid(-beta * h) + eps * beta * sigmoid(beta * h)
    return loss, dh, -dh


def hinge(p, beta=0.1):
    # loss = max(0, 1 - beta h): pair 0: 1 - 0.14 = 0.86, pair 1: 1 + 0.13 = 1.13; slope -beta while active
    h = (p.c - p.rc) - (p.r - p.rr)
    active = beta * h < 1
    return max(0.0, 1 - beta * h), -beta * active, beta * active


def ipo_averaged(p, beta=0.1):
    # per-token ratios: pair 0: 0.9/4 - (-0.5)/5 = 0.325, pair 1: -0.6/6 - 0.7/3 = -1/3; target 1/(2 beta) = 5
    # loss = (0.325 - 5)^2 = 21.855625 and (-1/3 - 5)^2 = 28.444; d/dc = 2(hbar - 5)/nc, d/dr = -2(hbar - 5)/nr
    hbar = (p.c - p.rc) / p.nc - (p.r - p.rr) / p.nr
    residual = hbar - 1 / (2 * beta)
    return residual**2, 2 * residual / p.nc, -2 * residual / p.nr


def ipo_given(p, beta=0.1):
    # no token counts: the values are taken as averages already: (1.4 - 5)^2 = 12.96, (-1.3 - 5)^2 = 39.69
    h = (p.c - p.rc) - (p.r - p.rr)
    return (h - 5) ** 2, 2 * (h - 5), -2 * (h - 5)


def robust(p, beta=0.1, eps=0.2):
    # loss = ((1 - eps) softplus(-beta h) - eps softplus(beta h)) / (1 - 2 eps)
    # d/dh = beta (-(1 - eps) sigmoid(-beta h) - eps sigmoid(beta h)) / (1 - 2 eps)
    h = (p.c - p.rc) - (p.r - p.rr)
    loss = ((1 - eps) * softplus(-beta * h) - eps * softplus(beta * h)) / (1 - 2 * eps)
    dh = beta * (-(1 - eps) * sigmoid(-beta * h) - eps * sigmoid(beta * h)) / (1 - 2 * eps)
    return loss, dh, -dh


def simpo(p, beta=2.0, gamma=0.5):
    # z = beta (c/nc - r/nr) - gamma: pair 0: 2 (-3.075 + 3.02) - 0.5 = -0.61, pair 1: 2 (-3.45 + 6.0667) - 0.5 = 4.7333
    # loss = softplus(-z); d/dc = -beta sigmoid(-z) / nc, d/dr = beta sigmoid(-z) / nr
    z = beta * (p.c / p.nc - p.r / p.nr) - gamma
    return softplus(-z), -beta * sigmoid(-z) / p.nc, beta * sigmoid(-z) / p.nr


def rpo(p, beta=0.1, alpha=0.5):
    # loss = dpo + alpha * (-c / nc): NLL terms 12.3/4 = 3.075 and 20.7/6 = 3.45; d/dc gains -alpha/nc
    loss, dc, dr = dpo(p, beta)
    return loss + alpha * (-p.c / p.nc), dc - alpha / p.nc, dr


def mdpo(p, beta=0.1, w_conditional=1.0, w_anchor=1.0, delta=0.0):
    # conditional margin hc = (c - rc) - (cc - rcc) = [1.2, 0.1]; anchor a = beta (c - rc) - delta
    # loss = softplus(-beta h) + wc softplus(-beta hc) + wa softplus(-a)
    # d/dc = -beta sigmoid(-beta h) - wc beta sigmoid(-beta hc) - wa beta sigmoid(-a); d/dr = beta sigmoid(-beta h)
    h = (p.c - p.rc) - (p.r - p.rr)
    hc = (p.c - p.rc) - (p.cc - p.rcc)
    a = beta * (p.c - p.rc) - delta
    loss = softplus(-beta * h) + w_conditional * softplus(-beta * hc) + w_anchor * softplus(-a)
    dc = -beta * sigmoid(-beta * h) - w_conditional * beta * sigmoid(-beta * hc) - w_anchor * beta * sigmoid(-a)
    return loss, dc, beta * sigmoid(-beta * h)


# (name, loss options, closed form, pass token counts, pass mDPO extras)
CASES = {
    "sigmoid": ("sigmoid", {}, dpo, False, False),
    "cdpo": ("sigmoid", {"label_smoothing": 0.2}, lambda p: dpo(p, eps=0.2), False, False),
    "hinge": ("hinge", {}, hinge, False, False),
    "ipo-counts": ("ipo", {}, ipo_averaged, True, False),
    "ipo-no-counts": ("ipo", {}, ipo_given, False, False),
    "robust": ("robust", {"label_smoothing": 0.2}, robust, False, False),
    "simpo": ("simpo", {"beta": 2.0, "simpo_gamma": 0.5}, simpo, True, False),
    "rpo": ("rpo", {"rpo_alpha": 0.5}, rpo, True, False),
    "mdpo-paper": ("mdpo", {}, mdpo, False, True),
    "mdpo-weighted": (
        "mdpo",
        {"mdpo_conditional_weight": 0.5, "mdpo_anchor_weight": 2.0, "mdpo_anchor_delta": 0.05},
        lambda p: mdpo(p, w_conditional=0.5, w_anchor=2.0, delta=0.05),
        False,
        True,
    ),
}


def make_logps(dtype, counts=False, extras=False, reference=True, values=INPUTS):
    def leaf(key):
        return torch.tensor(values[key], dtype=dtype, requires_grad=True)

    return PreferenceLogps(
        chosen=leaf("chosen"),
        rejected=leaf("rejected"),
        ref_chosen=leaf("ref_chosen") if reference else None,
        ref_rejected=leaf("ref_rejected") if reference else None,
        chosen_token_count=torch.tensor(COUNTS["chosen_token_count"]) if counts else None,
        rejected_token_count=torch.tensor(COUNTS["rejected_token_count"]) if counts else None,
        extras={key: leaf(key) for key in (CORRUPTED_CHOSEN, REF_CORRUPTED_CHOSEN)} if extras else {},
    )


def compute(loss_type, logps, **options):
    manager = create_plugin_manager(load_entry_points=False)
    config = manager.load_config({"loss": {"type": loss_type, **options}})
    return manager.hook.vlm_dpo_compute_loss(logps=logps, config=config)


def stored(dtype):
    """The pairs as the input dtype holds them (the hand formulas are exact arithmetic on these values)."""
    held = {key: torch.tensor(values, dtype=dtype).double().tolist() for key, values in INPUTS.items()}
    return [
        Pair(*(held[key][i] for key in INPUTS), COUNTS["chosen_token_count"][i], COUNTS["rejected_token_count"][i])
        for i in range(2)
    ]


GRADIENT_REL = {torch.float32: 1e-5, torch.bfloat16: 2**-8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_losses_and_policy_gradients_match_the_closed_forms(case, dtype):
    loss_type, options, closed_form, counts, extras = CASES[case]
    logps = make_logps(dtype, counts, extras)
    output = compute(loss_type, logps, **options)
    assert output.losses.dtype == torch.float32  # fp32 whatever the input dtype
    output.losses.sum().backward()
    for index, pair in enumerate(stored(dtype)):
        loss, d_chosen, d_rejected = closed_form(pair)
        assert float(output.losses[index].detach()) == pytest.approx(loss, rel=1e-5)
        assert float(logps.chosen.grad[index]) == pytest.approx(d_chosen, rel=GRADIENT_REL[dtype])
        assert float(logps.rejected.grad[index]) == pytest.approx(d_rejected, rel=GRADIENT_REL[dtype])


def test_bf16_inputs_differ_from_the_nominal_values_by_more_than_the_tolerance():
    # Evaluating the closed form at the stored bf16 values is what makes rel 1e-5 achievable: at the nominal
    # values the SimPO loss differs by far more than that, so the bf16 case checks the fp32 arithmetic, not luck.
    nominal, held = simpo(PAIRS[0])[0], simpo(stored(torch.bfloat16)[0])[0]
    assert abs(nominal - held) > 100 * 1e-5 * abs(nominal)


def test_mdpo_gradient_reaches_the_corrupted_image_log_probs():
    # d/dcc = wc * beta * sigmoid(-beta hc) with hc = [1.2, 0.1]: [0.1 * sigmoid(-0.12), 0.1 * sigmoid(-0.01)]
    logps = make_logps(torch.float32, extras=True)
    compute("mdpo", logps).losses.sum().backward()
    expected = [0.1 * sigmoid(-0.1 * 1.2), 0.1 * sigmoid(-0.1 * 0.1)]
    assert logps.extras[CORRUPTED_CHOSEN].grad.tolist() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "case, chosen_rewards, rejected_rewards",
    [
        ("sigmoid", [0.09, -0.06], [-0.05, 0.07]),  # beta * ratio
        ("ipo-counts", [0.1 * 0.9 / 4, 0.1 * -0.6 / 6], [0.1 * -0.5 / 5, 0.1 * 0.7 / 3]),  # beta * ratio / count
        ("simpo", [2 * -12.3 / 4, 2 * -20.7 / 6], [2 * -15.1 / 5, 2 * -18.2 / 3]),  # beta * c / nc, no reference
    ],
)
def test_rewards_and_shared_metrics(case, chosen_rewards, rejected_rewards):
    loss_type, options, _, counts, extras = CASES[case]
    output = compute(loss_type, make_logps(torch.float32, counts, extras), **options)
    assert not output.chosen_rewards.requires_grad
    assert output.chosen_rewards.tolist() == pytest.approx(chosen_rewards, rel=1e-5)
    assert output.rejected_rewards.tolist() == pytest.approx(rejected_rewards, rel=1e-5)
    margins = [c - r for c, r in zip(chosen_rewards, rejected_rewards)]
    assert output.metrics["rewards/chosen"] == pytest.approx(sum(chosen_rewards) / 2, rel=1e-5)
    assert output.metrics["rewards/margins"] == pytest.approx(sum(margins) / 2, rel=1e-5, abs=1e-7)
    assert output.metrics["rewards/accuracies"] == sum(m > 0 for m in margins) / 2


def test_variant_terms_are_reported():
    rpo_output = compute("rpo", make_logps(torch.float32, counts=True), rpo_alpha=0.5)
    assert rpo_output.metrics["rpo/nll"] == pytest.approx((12.3 / 4 + 20.7 / 6) / 2, rel=1e-5)
    assert rpo_output.metrics["rpo/dpo_loss"] == pytest.approx((dpo(PAIRS[0])[0] + dpo(PAIRS[1])[0]) / 2, rel=1e-5)
    mdpo_output = compute("mdpo", make_logps(torch.float32, extras=True))
    # conditional margins beta * hc = [0.12, 0.01], both positive;
    # anchor -log sigmoid(beta (c - rc)) with beta (c - rc) = [0.09, -0.06]
    assert mdpo_output.metrics["mdpo/conditional_margins"] == pytest.approx((0.12 + 0.01) / 2, rel=1e-5)
    assert mdpo_output.metrics["mdpo/conditional_accuracies"] == 1.0
    assert mdpo_output.metrics["mdpo/anchor_loss"] == pytest.approx((softplus(-0.09) + softplus(0.06)) / 2, rel=1e-5)
    assert compute("ipo", make_logps(torch.float32, counts=True)).metrics["ipo/length_normalised"] == 1.0
    assert compute("ipo", make_logps(torch.float32)).metrics["ipo/length_normalised"] == 0.0


def mpo(pairs, beta=0.1, weights=(0.8, 0.2, 1.0), running_baseline=True):
    """Per pair (loss, d sum(losses) / d c, d sum(losses) / d r) for a whole batch: MPO's baseline and its
    generation term are batch quantities.

    delta = mean of every implicit reward of the batch = 0.1 * (0.9 - 0.6 - 0.5 + 0.7) / 4 = 0.0125 (a fresh
    baseline takes the first batch's mean); generation g = -(c0 + c1) / (nc0 + nc1) = 33 / 10 = 3.3, the same
    for every pair, so each pair's copy adds -wg / 10 to d/dc_i: 2 pairs, -2 wg / 10 in all.
    """
    wp, wq, wg = weights
    rewards = [beta * (p.c - p.rc) for p in pairs] + [beta * (p.r - p.rr) for p in pairs]
    delta = sum(rewards) / len(rewards) if running_baseline else 0.0
    generation = -sum(p.c for p in pairs) / sum(p.nc for p in pairs)
    d_generation = -len(pairs) * wg / sum(p.nc for p in pairs)
    results = []
    for p in pairs:
        h, chosen, rejected = (p.c - p.rc) - (p.r - p.rr), beta * (p.c - p.rc), beta * (p.r - p.rr)
        loss = wp * softplus(-beta * h) + wq * (softplus(-(chosen - delta)) + softplus(rejected - delta))
        loss += wg * generation
        d_chosen = -wp * beta * sigmoid(-beta * h) - wq * beta * sigmoid(-(chosen - delta)) + d_generation
        d_rejected = wp * beta * sigmoid(-beta * h) + wq * beta * sigmoid(rejected - delta)
        results.append((loss, d_chosen, d_rejected))
    return results


MPO_CASES = {
    "paper": ({}, {}),
    "trl-1.x": ({"mpo_running_baseline": False}, {"running_baseline": False}),
    "weighted": (
        {"mpo_preference_weight": 1.0, "mpo_quality_weight": 0.5, "mpo_generation_weight": 0.0},
        {"weights": (1.0, 0.5, 0.0)},
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(MPO_CASES))
def test_mpo_matches_its_closed_form(case, dtype):
    options, closed_form_options = MPO_CASES[case]
    logps = make_logps(dtype, counts=True)
    output = compute("mpo", logps, **options)
    assert output.losses.dtype == torch.float32
    output.losses.sum().backward()
    for index, (loss, d_chosen, d_rejected) in enumerate(mpo(stored(dtype), **closed_form_options)):
        assert float(output.losses[index].detach()) == pytest.approx(loss, rel=1e-5)
        assert float(logps.chosen.grad[index]) == pytest.approx(d_chosen, rel=GRADIENT_REL[dtype])
        assert float(logps.rejected.grad[index]) == pytest.approx(d_rejected, rel=GRADIENT_REL[dtype])
    pairs = stored(dtype)  # 0.0125 and 3.3 at the nominal values (fp32); bf16 holds others
    rewards = [0.1 * (p.c - p.rc) for p in pairs] + [0.1 * (p.r - p.rr) for p in pairs]
    expected_delta = sum(rewards) / 4 if options.get("mpo_running_baseline", True) else 0.0
    assert output.metrics["mpo/reward_baseline"] == pytest.approx(expected_delta, rel=1e-5, abs=1e-9)
    assert output.metrics["mpo/generation_loss"] == pytest.approx(-(pairs[0].c + pairs[1].c) / 10, rel=1e-5)
    assert output.metrics["rewards/chosen"] == pytest.approx(sum(rewards[:2]) / 2, rel=1e-5)


def mpo_run(config=None):
    """A manager whose ``mpo`` variant keeps its baseline between calls, as within one training run."""
    manager = create_plugin_manager(load_entry_points=False)
    config = manager.load_config({"loss": {"type": "mpo", **(config or {})}})

    def step(rewards_mean, *, trains=True):
        # One pair whose chosen and rejected rewards average to rewards_mean (beta 0.1): ratios 10 * mean each.
        ratio = torch.tensor([10.0 * rewards_mean], requires_grad=trains)
        zero = torch.zeros(1)
        logps = PreferenceLogps(
            chosen=ratio - 5.0, rejected=ratio.detach() - 7.0, ref_chosen=zero - 5.0, ref_rejected=zero - 7.0,
            chosen_token_count=torch.tensor([4]), rejected_token_count=torch.tensor([4]),
        )
        return manager.hook.vlm_dpo_compute_loss(logps=logps, config=config).metrics["mpo/reward_baseline"]

    return manager, step


def test_mpos_baseline_is_the_running_mean_of_training_batches_only():
    manager, step = mpo_run()
    assert step(0.2) == pytest.approx(0.2)  # the first batch's mean
    assert step(0.4) == pytest.approx(0.3)  # (0.2 + 0.4) / 2
    assert step(5.0, trains=False) == pytest.approx(0.3)  # an evaluation batch reads it, does not move it
    assert step(float("nan")) == pytest.approx(0.3)  # nor does a batch whose rewards are not finite
    assert step(0.9) == pytest.approx(0.5)  # (0.2 + 0.4 + 0.9) / 3
    assert manager.collect_states()["losses"] == {"reward_baseline": {"mean": pytest.approx(0.5), "count": 3}}


def test_a_skipped_step_takes_back_what_its_batches_did_to_mpos_baseline():
    manager, step = mpo_run()
    step(0.2)
    manager.hook.vlm_dpo_step_begin(step=1, model=torch.nn.Linear(1, 1))
    step(1.0), step(2.0)  # two micro-batches of the step that is then skipped
    signals = StepSignals(step=1, loss=float("nan"), grad_norm=float("nan"), learning_rate=0.1)
    manager.hook.vlm_dpo_after_optimizer_step(signals=signals, skipped=True, reasons=["non-finite loss"])
    assert step(0.4) == pytest.approx(0.3)
    manager.hook.vlm_dpo_step_begin(step=2, model=torch.nn.Linear(1, 1))
    step(0.9)
    manager.hook.vlm_dpo_after_optimizer_step(signals=signals, skipped=False, reasons=[])
    assert manager.collect_states()["losses"]["reward_baseline"] == {"mean": pytest.approx(0.5), "count": 3}


def test_mpos_baseline_resumes_from_the_checkpoint_state_and_refuses_a_broken_one():
    manager, step = mpo_run()
    manager.hook.vlm_dpo_load_state_dict(states={"losses": {"reward_baseline": {"mean": 0.25, "count": 3}}})
    assert step(0.65) == pytest.approx(0.35)  # (0.25 * 3 + 0.65) / 4
    manager.hook.vlm_dpo_load_state_dict(states={"guards": {}})  # a checkpoint from before: nothing to restore
    assert step(0.35) == pytest.approx(0.35)
    for broken in ({"mean": float("nan"), "count": 3}, {"mean": 0.1, "count": -1}, {"mean": "0.1", "count": 1}, [1]):
        with pytest.raises(PluginError, match=r"plugin state losses.reward_baseline is .*; expected \{'mean': a "):
            manager.hook.vlm_dpo_load_state_dict(states={"losses": {"reward_baseline": broken}})


def test_llamafactory_hand_check_and_ln2_at_zero_margin():
    # log-ratio margin 1.5, beta 0.1: -log sigmoid(0.15) = 0.6210; hinge 1 - 0.15; IPO (1.5 - 5)^2
    def margin(value):
        zero = torch.zeros(1)
        return PreferenceLogps(chosen=torch.tensor([value]), rejected=zero, ref_chosen=zero, ref_rejected=zero)

    assert float(compute("sigmoid", margin(1.5)).losses[0]) == pytest.approx(0.6210, abs=1e-4)
    assert float(compute("hinge", margin(1.5)).losses[0]) == pytest.approx(0.85, rel=1e-6)
    assert float(compute("ipo", margin(1.5)).losses[0]) == pytest.approx(12.25, rel=1e-6)
    assert float(compute("sigmoid", margin(0.0)).losses[0]) == pytest.approx(math.log(2))


def test_bf16_log_probs_are_promoted_to_fp32_unless_switched_off():
    # Summed log-probs of long responses are large; bf16 spacing at 1000 is 8, so a bf16 margin of 0.5 is 0.
    logps = PreferenceLogps(
        chosen=torch.tensor([-1000.0]).bfloat16(), rejected=torch.tensor([-1000.0]).bfloat16(),
        ref_chosen=torch.tensor([-1000.0]).bfloat16(), ref_rejected=torch.tensor([-1000.0]).bfloat16(),
        extras={},
    )
    assert compute("sigmoid", logps).losses.dtype == torch.float32
    assert compute("sigmoid", logps, fp32_logps=False).losses.dtype == torch.bfloat16
    doubles = make_logps(torch.float64)
    assert compute("sigmoid", doubles).losses.dtype == torch.float64  # promoted to at least fp32, never narrowed


# -- inputs: what each variant needs, and the error when it is missing ---------------------------------------


def test_registry_names_match_the_config_and_the_declared_inputs():
    assert set(builtin_losses(RewardBaseline())) == set(BUILTIN_LOSS_TYPES) == set(BUILTIN_LOSS_INPUTS)
    manager = create_plugin_manager(load_entry_points=False)
    assert set(BUILTIN_LOSS_TYPES) <= set(manager.loss_functions())
    assert manager.hook.vlm_dpo_loss_inputs(loss_type="simpo") == LossInputs(reference=False, token_counts=True)
    assert manager.hook.vlm_dpo_loss_inputs(loss_type="mdpo").extras == (CORRUPTED_CHOSEN, REF_CORRUPTED_CHOSEN)
    assert manager.hook.vlm_dpo_loss_inputs(loss_type="someone-elses") is None


OPTIONS = {name: CASES[case][1] for case, name in
           [("sigmoid", "sigmoid"), ("hinge", "hinge"), ("ipo-counts", "ipo"), ("robust", "robust"),
            ("simpo", "simpo"), ("rpo", "rpo"), ("mdpo-paper", "mdpo")]} | {"mpo": {}}


@pytest.mark.parametrize("loss_type", BUILTIN_LOSS_TYPES)
def test_each_variant_runs_on_exactly_its_declared_inputs(loss_type):
    needs = BUILTIN_LOSS_INPUTS[loss_type]
    minimal = make_logps(torch.float32, counts=needs.token_counts, extras=bool(needs.extras), reference=needs.reference)
    assert torch.isfinite(compute(loss_type, minimal, **OPTIONS[loss_type]).losses).all()
    if needs.reference:
        with pytest.raises(ValueError, match=rf"loss '{loss_type}' needs the reference log-probs"):
            compute(loss_type, make_logps(torch.float32, needs.token_counts, bool(needs.extras), reference=False),
                    **OPTIONS[loss_type])
    if needs.token_counts:
        with pytest.raises(ValueError, match=r"needs PreferenceLogps.chosen_token_count and .rejected_token_count"):
            compute(loss_type, make_logps(torch.float32, extras=bool(needs.extras)), **OPTIONS[loss_type])


def test_missing_mdpo_extras_name_the_keys():
    with pytest.raises(ValueError) as error:
        compute("mdpo", make_logps(torch.float32))
    assert str(error.value) == (
        "loss 'mdpo' needs PreferenceLogps.extras['chosen_corrupted_image', 'ref_chosen_corrupted_image'] "
        "(see docs/losses.md for what each holds); extras has []"
    )


def test_a_zero_token_count_names_the_pair_when_the_variant_divides_by_it():
    logps = make_logps(torch.float32, counts=True)
    logps.rejected_token_count = torch.tensor([5, 0])
    expected = r"loss 'simpo': PreferenceLogps.rejected_token_count is < 1 for pair\(s\) \[1\]"
    with pytest.raises(ValueError, match=expected):
        compute("simpo", logps, beta=2.0)
    # sigmoid never divides by the counts: an empty response is the collation checks' to report or skip
    assert torch.isfinite(compute("sigmoid", logps).losses).all()


def test_mismatched_shapes_and_a_lone_token_count_are_refused():
    logps = make_logps(torch.float32)
    logps.rejected = torch.zeros(3)
    with pytest.raises(ValueError, match=r"PreferenceLogps.rejected has shape \(3,\), expected \(2,\)"):
        compute("sigmoid", logps)
    logps = make_logps(torch.float32)
    logps.chosen_token_count = torch.tensor([4, 6])
    with pytest.raises(ValueError, match=r"chosen_token_count is set but not the other count"):
        compute("ipo", logps)


def test_extra_rows_are_split_off_the_pairs_into_extras():
    # Two pairs: rows 0-1 chosen, 2-3 rejected, 4-5 the chosen again under the corrupted image.
    policy = SequenceLogps(torch.tensor([-1.0, -2.0, -3.0, -4.0, -14.0, -20.9]), torch.tensor([4, 6, 5, 5, 4, 6]))
    reference = SequenceLogps(torch.tensor([-1.5, -2.5, -3.5, -4.5, -13.7, -20.2]), torch.tensor([4, 6, 5, 5, 4, 6]))
    pairs_policy, pairs_reference, extras = split_extras(policy, reference, 2, [CORRUPTED_IMAGE_ROWS])
    assert pairs_policy.logps.tolist() == [-1.0, -2.0, -3.0, -4.0]
    assert pairs_reference.logps.tolist() == [-1.5, -2.5, -3.5, -4.5]
    assert extras[CORRUPTED_CHOSEN].tolist() == pytest.approx([-14.0, -20.9])
    assert extras[REF_CORRUPTED_CHOSEN].tolist() == pytest.approx([-13.7, -20.2])
    shorter = SequenceLogps(reference.logps, torch.tensor([4, 6, 5, 5, 4, 5]))
    with pytest.raises(ValueError, match=r"different numbers of response tokens \(\[4, 6\] vs \[4, 5\]\)"):
        split_extras(policy, shorter, 2, [CORRUPTED_IMAGE_ROWS])


# -- configuration -------------------------------------------------------------------------------------------


def test_unknown_loss_type_fails_when_the_config_is_loaded():
    manager = create_plugin_manager(load_entry_points=False)
    expected = r"'loss.type' is 'simpoo'; registered variants: \[.*'simpo'.*\]; did you mean 'simpo'\?"
    with pytest.raises(ConfigError, match=expected):
        manager.load_config({"loss": {"type": "simpoo"}})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"type": "simpo", "simpo_gamma": -1}, "'loss.simpo_gamma' is -1.0; expected a target reward margin >= 0"),
        ({"type": "rpo", "rpo_alpha": 0}, "'loss.rpo_alpha' is 0.0; expected a weight > 0 for the chosen NLL term"),
        ({"type": "mdpo", "mdpo_anchor_weight": -0.5}, "'loss.mdpo_anchor_weight' is -0.5; expected a weight >= 0"),
        ({"type": "mdpo", "mdpo_anchor_delta": float("nan")}, "'loss.mdpo_anchor_delta' is nan; expected a finite"),
        ({"type": "robust"}, "'loss.label_smoothing' is 0.0; expected the assumed label-flip rate in (0, 0.5)"),
        ({"type": "mpo", "mpo_quality_weight": -0.2}, "'loss.mpo_quality_weight' is -0.2; expected a finite weight"),
        (
            {"type": "mpo", "mpo_preference_weight": 0, "mpo_quality_weight": 0, "mpo_generation_weight": 0},
            "'loss.mpo_preference_weight' is 0.0; expected a weight > 0 for one of the three MPO terms at least",
        ),
        ({"type": "sigmoid", "mpo_running_baseline": False}, "'sigmoid' does not read it; it applies to 'mpo'"),
        (
            {"type": "sigmoid", "rpo_alpha": 0.5},
            (
                "'loss.rpo_alpha' is 0.5; expected 1.0 (the default): loss.type 'sigmoid' does not read it; "
                "it applies to 'rpo'"
            ),
        ),
        ({"type": "ipo", "label_smoothing": 0.1}, "'ipo' does not read it; it applies to 'sigmoid', 'robust'"),
        ({"type": "simpo", "simpo_gammma": 1.0}, "key 'loss.simpo_gammma'; did you mean 'loss.simpo_gamma'"),
    ],
)
def test_variant_settings_are_validated_with_the_key_named(options, message):
    manager = create_plugin_manager(load_entry_points=False)
    with pytest.raises(ConfigError) as error:
        manager.load_config({"loss": options})
    assert message in str(error.value)


def test_a_third_party_variant_may_read_any_key():
    assert LossConfig(type="my_variant", rpo_alpha=0.3, simpo_gamma=2.0).rpo_alpha == 0.3
