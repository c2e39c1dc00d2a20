"""Per-group optimizer param groups and progressive unfreezing into a live AdamW, on the tiny LLaVA.

Every expected parameter change is AdamW's update computed by hand from the gradients
the test sets: m_t = b1 m + (1 - b1) g, v_t = b2 v + (1 - b2) g^2,
delta = -lr * (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps), with weight decay 0.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from vlm_dpo_plugins.freeze.apply import apply_trainable
from vlm_dpo_plugins.freeze.optimizer import optimizer_param_groups, unfreeze_into_optimizer
from vlm_dpo_plugins.manager import create_plugin_manager

transformers = pytest.importorskip("transformers")

BETAS, EPS = (0.9, 0.999), 1e-8
BASE_LR, PROJECTOR_LR, VISION_LR = 1e-3, 4e-3, 2e-4


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from vlm_dpo_plugins.tiny import build_tiny_llava

    path = build_tiny_llava(tmp_path_factory.mktemp("llava"))
    return transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)


def adam_delta(gradients: list[float], lr: float) -> float:
    """AdamW's change of a weight after one step per gradient in ``gradients`` (weight decay 0)."""
    m = v = 0.0
    delta = 0.0
    for t, g in enumerate(gradients, start=1):
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        delta += -lr * (m / (1 - BETAS[0] ** t)) / (math.sqrt(v / (1 - BETAS[1] ** t)) + EPS)
    return delta


class Plan:
    """The adapter's side of the freeze policy: classify once, then ask for the trainable set per step."""

    def __init__(self, model, freeze):
        self.manager = create_plugin_manager(load_entry_points=False)
        self.manager.hook.vlm_dpo_configure(config=self.manager.load_config({"freeze": freeze}))
        self.model = model
        self.groups = self.manager.hook.vlm_dpo_classify_parameters(model=model, model_type="llava")

    def trainable(self, step):
        return self.manager.hook.vlm_dpo_trainable_parameters(groups=self.groups, step=step)

    def optimizer_groups(self, step):
        return self.manager.hook.vlm_dpo_optimizer_groups(
            groups=self.groups, trainable=self.trainable(step), base_learning_rate=BASE_LR
        )

    def learning_rates(self):
        return {entry["group"]: entry["lr"] for entry in self.optimizer_groups(0)}


def set_gradients(model, value: float):
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, value) if parameter.requires_grad else None


def values(model, names):
    parameters = dict(model.named_parameters())
    return {name: parameters[name].detach().clone() for name in names}


def assert_moved(before, model, expected_delta):
    parameters = dict(model.named_parameters())
    for name, old in before.items():
        torch.testing.assert_close(
            parameters[name].detach() - old, torch.full_like(old, expected_delta), rtol=0, atol=1e-7, msg=name
        )


def snapshot_state(optimizer):
    return {
        id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in optimizer.state.items()
    }


def params_in(optimizer):
    return [id(p) for group in optimizer.param_groups for p in group["params"]]


STAGES = {
    "learning_rates": {"projector": PROJECTOR_LR, "vision": VISION_LR},
    # The vision stages join one group twice: the top block first, then the one below it.
    "unfreeze": [
        {"at_step": 2, "groups": ["projector"]},
        {"at_step": 3, "vision_blocks": 1},
        {"at_step": 4, "vision_blocks": 2},
    ],
}


def test_param_groups_from_the_hook_train_each_group_at_its_rate(tiny_llava):
    model = copy.deepcopy(tiny_llava)
    plan = Plan(model, {"trainable": ["language", "projector"], "learning_rates": {"projector": PROJECTOR_LR}})
    apply_trainable(model, plan.trainable(0))
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(model, plan.optimizer_groups(0)), betas=BETAS, eps=EPS, weight_decay=0.0
    )
    assert [(g["group"], g["lr"]) for g in optimizer.param_groups] == [
        ("projector", PROJECTOR_LR),
        ("language", BASE_LR),
    ]
    before = values(model, [n for n, _ in model.named_parameters()])
    set_gradients(model, 0.5)
    optimizer.step()
    assert_moved({n: before[n] for n in plan.groups["projector"]}, model, adam_delta([0.5], PROJECTOR_LR))
    assert_moved({n: before[n] for n in plan.groups["language"]}, model, adam_delta([0.5], BASE_LR))
    assert_moved({n: before[n] for n in plan.groups["vision"]}, model, 0.0)


def test_weight_decay_splits_each_group_and_spares_biases_and_norms(tiny_llava):
    plan = Plan(tiny_llava, {"trainable": ["language", "projector"]})
    param_groups = optimizer_param_groups(tiny_llava, plan.optimizer_groups(0), weight_decay=0.1)
    assert [(g["group"], g["weight_decay"]) for g in param_groups] == [
        ("projector", 0.1),
        ("projector", 0.0),
        ("language", 0.1),
        ("language", 0.0),
    ]
    assert all(p.ndim >= 2 for g in param_groups if g["weight_decay"] for p in g["params"])
    assert all(p.ndim == 1 for g in param_groups if not g["weight_decay"] for p in g["params"])


def test_unfreezing_into_a_framework_built_optimizer_keeps_its_state_and_adds_each_parameter_once(tiny_llava):
    model = copy.deepcopy(tiny_llava)
    plan = Plan(
        model, {"learning_rates": {"projector": PROJECTOR_LR}, "unfreeze": [{"at_step": 2, "groups": ["projector"]}]}
    )
    apply_trainable(model, plan.trainable(0))
    # What a framework builds: every trainable parameter, one group, no tags.
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=BASE_LR, betas=BETAS, eps=EPS, weight_decay=0.0
    )
    language, projector = plan.groups["language"], plan.groups["projector"]
    start = values(model, language)
    for _ in range(2):  # steps 0 and 1
        set_gradients(model, 2.0)
        optimizer.step()

    state_before = snapshot_state(optimizer)
    newly = apply_trainable(model, plan.trainable(2))
    assert newly == set(projector)
    added = unfreeze_into_optimizer(model, optimizer, newly, plan.groups, plan.learning_rates())
    assert added == {"projector": projector}
    assert [(g.get("group"), g["lr"]) for g in optimizer.param_groups] == [(None, BASE_LR), ("projector", PROJECTOR_LR)]
    # Existing state is untouched, bit for bit, and nothing exists yet for the new parameters.
    state_after = snapshot_state(optimizer)
    assert state_after.keys() == state_before.keys()
    for key, state in state_before.items():
        for field, value in state.items():
            assert torch.equal(state_after[key][field], value), field

    # Asking again, or with parameters already in the optimizer, adds nothing.
    count = len(params_in(optimizer))
    again = unfreeze_into_optimizer(
        model, optimizer, set(projector) | set(language[:3]), plan.groups, plan.learning_rates()
    )
    assert again == {} and len(params_in(optimizer)) == count == len(set(params_in(optimizer)))

    before_projector = values(model, projector)
    set_gradients(model, 1.0)
    optimizer.step()  # step 2: the projector's first AdamW step, the language model's third
    assert_moved(before_projector, model, adam_delta([1.0], PROJECTOR_LR))
    assert_moved(start, model, adam_delta([2.0, 2.0, 1.0], BASE_LR))  # a reset state would give a different value


def test_a_framework_lambda_scheduler_is_extended_to_the_new_group(tiny_llava):
    model = copy.deepcopy(tiny_llava)
    plan = Plan(
        model, {"learning_rates": {"projector": PROJECTOR_LR}, "unfreeze": [{"at_step": 2, "groups": ["projector"]}]}
    )
    apply_trainable(model, plan.trainable(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=BASE_LR, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    unfreeze_into_optimizer(
        model,
        optimizer,
        apply_trainable(model, plan.trainable(2)),
        plan.groups,
        plan.learning_rates(),
        scheduler=scheduler,
    )
    assert optimizer.param_groups[1]["lr"] == pytest.approx(PROJECTOR_LR / 3)
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([BASE_LR / 4, PROJECTOR_LR / 4])
    assert scheduler.get_last_lr() == pytest.approx([BASE_LR / 4, PROJECTOR_LR / 4])


def test_a_scheduler_that_cannot_be_extended_is_refused_with_the_way_out(tiny_llava):
    model = copy.deepcopy(tiny_llava)
    plan = Plan(model, {"unfreeze": [{"at_step": 2, "groups": ["projector"]}]})
    apply_trainable(model, plan.trainable(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=BASE_LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    with pytest.raises(
        TypeError, match="build the optimizer with vlm_dpo_plugins.freeze.optimizer.optimizer_param_groups"
    ):
        unfreeze_into_optimizer(
            model,
            optimizer,
            apply_trainable(model, plan.trainable(2)),
            plan.groups,
            plan.learning_rates(),
            scheduler=scheduler,
        )


def test_stages_join_the_groups_built_empty_at_step_0_and_follow_the_schedule(tiny_llava):
    model = copy.deepcopy(tiny_llava)
    plan = Plan(model, STAGES)
    apply_trainable(model, plan.trainable(0))
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(model, plan.optimizer_groups(0)), betas=BETAS, eps=EPS, weight_decay=0.0
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    assert [(g["group"], len(g["params"])) for g in optimizer.param_groups] == [
        ("vision", 0),
        ("projector", 0),
        ("language", len(plan.groups["language"])),
    ]
    top_block = [n for n in plan.groups["vision"] if ".encoder.layers.1." in n]
    block_below = [n for n in plan.groups["vision"] if ".encoder.layers.0." in n]
    for step in range(5):
        newly = apply_trainable(model, plan.trainable(step))
        unfreeze_into_optimizer(model, optimizer, newly, plan.groups, plan.learning_rates())
        moving = {2: plan.groups["projector"], 3: top_block, 4: block_below}.get(step, [])
        before = values(model, moving)
        set_gradients(model, 1.0)
        optimizer.step()
        if moving:  # a first AdamW step at the group's rate times the schedule's factor for this step
            rate = {2: PROJECTOR_LR, 3: VISION_LR, 4: VISION_LR}[step] * 0.5**step
            assert_moved(before, model, adam_delta([1.0], rate))
        scheduler.step()
    assert len(optimizer.param_groups) == 3  # joined, never a new group

    # The state layout is what a resumed run builds fresh for step 5, so load_state_dict maps it back.
    fresh = torch.optim.AdamW(optimizer_param_groups(model, plan.optimizer_groups(5)))
    for live, rebuilt in zip(optimizer.param_groups, fresh.param_groups, strict=True):
        assert [id(p) for p in live["params"]] == [id(p) for p in rebuilt["params"]], live["group"]
    fresh.load_state_dict(optimizer.state_dict())
    parameters = dict(model.named_parameters())
    first_language = parameters[plan.groups["language"][0]]
    assert torch.equal(fresh.state[first_language]["step"], optimizer.state[first_language]["step"])


def test_an_unknown_parameter_name_is_an_error_naming_it(tiny_llava):
    plan = Plan(tiny_llava, {})
    optimizer = torch.optim.AdamW([next(tiny_llava.parameters())])
    with pytest.raises(KeyError, match="'no.such.weight' is not a parameter of the model"):
        unfreeze_into_optimizer(tiny_llava, optimizer, {"no.such.weight"}, plan.groups, {})
