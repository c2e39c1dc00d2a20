"""Gradient norms per group and clipping: hand-computed numbers, and torch's clip_grad_norm_ on the tiny VLMs."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_vlms import load_tiny_models

from vlm_dpo_plugins.guards.clipping import clip_grad_norms, measure_grad_norms, parameters_by_group
from vlm_dpo_plugins.manager import create_plugin_manager

transformers = pytest.importorskip("transformers")


def parameter(*grad):
    weight = torch.nn.Parameter(torch.zeros(len(grad)))
    weight.grad = torch.tensor(grad)
    return weight


@pytest.fixture
def groups():
    # vision: |(3, 4)| = 5; projector: |(12)| = 12; language has no gradient yet. Total sqrt(5² + 12²) = 13.
    no_gradient = torch.nn.Parameter(torch.ones(2))
    return {"vision": [parameter(3.0, 4.0)], "projector": [parameter(12.0)], "language": [no_gradient]}


def grads(groups):
    return {name: [p.grad.tolist() for p in params if p.grad is not None] for name, params in groups.items()}


def test_norms_per_group_and_total_by_hand(groups):
    norms = measure_grad_norms(groups)
    assert norms.total == pytest.approx(13.0)
    assert norms.groups == pytest.approx({"vision": 5.0, "projector": 12.0})  # no gradient: no entry, not a zero


def test_global_clip_scales_every_gradient_by_max_over_total(groups):
    norms = clip_grad_norms(groups, max_norm=6.5)
    assert norms.total == pytest.approx(13.0)  # reported before clipping
    coefficient = 6.5 / (13.0 + 1e-6)
    assert grads(groups) == {
        "vision": [pytest.approx([3.0 * coefficient, 4.0 * coefficient])],
        "projector": [pytest.approx([12.0 * coefficient])],
        "language": [],
    }


def test_group_clip_first_then_global_clip_on_what_is_left(groups):
    norms = clip_grad_norms(groups, max_norm=6.5, group_max_norms={"projector": 3.0})
    assert norms.groups == pytest.approx({"vision": 5.0, "projector": 12.0})
    # projector: 12 -> 3; total after sqrt(5² + 3²) = 5.83 <= 6.5, so the global clip leaves everything.
    assert grads(groups) == {"vision": [[3.0, 4.0]], "projector": [pytest.approx([3.0 * 12.0 / (12.0 + 1e-6)])],
                             "language": []}
    clip_grad_norms(groups, max_norm=2.0, group_max_norms={"projector": 3.0})
    # now: projector 3 -> 3 (no change), total sqrt(34) -> 2: everything times 2 / sqrt(34).
    coefficient = 2.0 / (math.sqrt(34.0) + 1e-6)
    assert grads(groups)["vision"] == [pytest.approx([3.0 * coefficient, 4.0 * coefficient], rel=1e-6)]


def test_under_the_limit_and_without_a_limit_nothing_changes(groups):
    clip_grad_norms(groups, max_norm=13.5)
    clip_grad_norms(groups, max_norm=None)
    assert grads(groups) == {"vision": [[3.0, 4.0]], "projector": [[12.0]], "language": []}


def test_a_non_finite_group_leaves_every_gradient_untouched(groups):
    groups["language"][0].grad = torch.tensor([float("inf"), 1.0])
    norms = clip_grad_norms(groups, max_norm=1.0)
    assert math.isinf(norms.total) and math.isinf(norms.groups["language"]) and norms.groups["vision"] == 5.0
    assert grads(groups)["vision"] == [[3.0, 4.0]]  # scaling by inf/NaN would have spread it everywhere


def test_bf16_gradients_are_summed_in_fp32():
    # 4096 values of 1.0: the exact norm is 64; each square is exact in bf16, but a bf16 sum would stall at 256.
    weight = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    weight.grad = torch.ones(4096, dtype=torch.bfloat16)
    assert measure_grad_norms({"language": [weight]}).total == 64.0


def test_no_gradient_anywhere_is_no_measurement():
    assert measure_grad_norms({"language": [torch.nn.Parameter(torch.ones(1))]}) is None
    assert clip_grad_norms({}, max_norm=1.0) is None


def test_parameters_by_group_keeps_trainable_ones_and_puts_unclassified_names_in_other():
    model = torch.nn.ModuleDict({name: torch.nn.Linear(1, 1) for name in ("tower", "lm", "lora_A")})
    model["tower"].requires_grad_(False)
    sorted_parameters = parameters_by_group(
        model.named_parameters(), {"vision": ["tower.weight", "tower.bias"], "language": ["lm.weight", "lm.bias"]}
    )
    assert sorted_parameters == {"language": [model["lm"].weight, model["lm"].bias],
                                 "other": [model["lora_A"].weight, model["lora_A"].bias]}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return load_tiny_models(tmp_path_factory.mktemp("models"))


def random_gradients(by_group):
    """Gradients for every group with the vision tower's ten times larger: an exploding group, as in the NaN case."""
    generator = torch.Generator().manual_seed(0)
    for group, params in by_group.items():
        for parameter in params:
            parameter.grad = torch.randn(parameter.shape, generator=generator) * (10.0 if group == "vision" else 1.0)


@pytest.mark.parametrize("model_name", ["llava", "qwen2_vl"])
def test_per_group_norms_and_clipping_match_torch_on_a_tiny_vlm(tiny_models, model_name):
    model = tiny_models[model_name]
    model.requires_grad_(True)
    manager = create_plugin_manager(load_entry_points=False)
    groups = manager.hook.vlm_dpo_classify_parameters(model=model, model_type=model.config.model_type)
    by_group = parameters_by_group(model.named_parameters(), groups)
    random_gradients(by_group)
    with_grads = [p for p in model.parameters() if p.grad is not None]
    reference_grads = [p.grad.clone() for p in with_grads]
    # float64, from the definition. torch's own fp32 norms (clip_grad_norm_ included) drift ~1e-4 from it over
    # the ~10M elements of Qwen2-VL's embedding on CPU, hence the looser tolerance against this one.
    exact = {
        group: math.sqrt(sum(p.grad.double().square().sum().item() for p in params if p.grad is not None))
        for group, params in by_group.items()
    }
    assert {"vision", "projector", "language"} <= set(exact)

    norms = clip_grad_norms(by_group, max_norm=0.1)

    assert norms.groups == pytest.approx(exact, rel=1e-3)
    assert norms.total == pytest.approx(math.sqrt(sum(n * n for n in exact.values())), rel=1e-3)
    reference = [torch.nn.Parameter(torch.empty_like(g)) for g in reference_grads]
    for copy, grad in zip(reference, reference_grads):
        copy.grad = grad
    torch_norm = torch.nn.utils.clip_grad_norm_(reference, max_norm=0.1)
    assert norms.total == pytest.approx(torch_norm.item(), rel=1e-6)
    assert norms.total > 0.1  # so the clip really happened
    for ours, theirs in zip(with_grads, reference):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-9)
