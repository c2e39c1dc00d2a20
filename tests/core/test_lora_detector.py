"""The lora-inert detector, on a hand-built module shaped like PEFT's LoRA layers (no peft needed)."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_dpo_plugins.diagnostics.lora import find_lora_layers, update_size
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import RunContext


class FakeLoraLinear(torch.nn.Module):
    """The attributes PEFT's ``lora.Linear`` carries: a base layer, A/B per adapter, r, alpha and scaling."""

    def __init__(self, features: int, r: int, alpha: float, adapter: str = "default") -> None:
        super().__init__()
        self.base_layer = torch.nn.Linear(features, features, bias=False)
        self.lora_A = torch.nn.ModuleDict({adapter: torch.nn.Linear(features, r, bias=False)})
        self.lora_B = torch.nn.ModuleDict({adapter: torch.nn.Linear(r, features, bias=False)})
        torch.nn.init.zeros_(self.lora_B[adapter].weight)  # PEFT's initialisation: the adapter starts as a no-op
        self.r = {adapter: r}
        self.lora_alpha = {adapter: alpha}
        self.scaling = {adapter: alpha / r}
        self.active_adapters = [adapter]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = self.active_adapters[0]
        return self.base_layer(x) + self.scaling[adapter] * self.lora_B[adapter](self.lora_A[adapter](x))


class TinyLoraModel(torch.nn.Module):
    def __init__(self, r: int = 16, alpha: float = 1.0, features: int = 24) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = FakeLoraLinear(features, r, alpha)
        self.v_proj = FakeLoraLinear(features, r, alpha)
        self.head = torch.nn.Linear(features, 4)

    def nudge_adapters(self, size: float) -> None:
        with torch.no_grad():
            for layer in (self.q_proj, self.v_proj):
                layer.lora_B["default"].weight.normal_(std=size)


def configured(config=None, model=None, uses_peft=False):
    manager = create_plugin_manager(load_entry_points=False)
    manager.hook.vlm_dpo_configure(config=manager.load_config(config or {}))
    if model is not None:
        context = RunContext(framework="test", uses_peft=uses_peft)
        manager.hook.vlm_dpo_train_begin(model=model, context=context)
    return manager


def log(manager, step, *, rewards=(0.0, 0.0), learning_rate=5e-6, loss=math.log(2)):
    chosen, rejected = rewards
    metrics = {
        "loss": loss,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "learning_rate": learning_rate,
    }
    return [finding for batch in manager.hook.vlm_dpo_on_log(step=step, metrics=metrics) for finding in batch]


def codes(findings):
    return [finding.code for finding in findings]


# -- finding the layers and measuring their update ---------------------------------------


def test_lora_layers_are_found_by_their_attributes_with_their_settings():
    layers = find_lora_layers(TinyLoraModel(r=64, alpha=1))
    assert [(layer.name, layer.adapter, layer.r, layer.alpha) for layer in layers] == [
        ("q_proj", "default", 64, 1),
        ("v_proj", "default", 64, 1),
    ]
    assert layers[0].scaling == pytest.approx(1 / 64)
    assert find_lora_layers(torch.nn.Sequential(torch.nn.Linear(3, 3))) == []


def test_update_size_equals_the_dense_scaling_times_b_at_a_over_w():
    model = TinyLoraModel(r=8, alpha=16)
    model.nudge_adapters(0.05)
    size = update_size(find_lora_layers(model))
    expected = []
    for layer in (model.q_proj, model.v_proj):
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        expected.append((torch.linalg.norm(delta) / torch.linalg.norm(layer.base_layer.weight)).item())
    assert size.layers == 2
    assert size.largest == pytest.approx(max(expected), rel=1e-4)
    assert size.median == pytest.approx(sum(expected) / 2, rel=1e-4)


def test_weights_that_say_nothing_about_the_update_are_left_out():
    model = TinyLoraModel()
    model.q_proj.base_layer.weight = torch.nn.Parameter(torch.empty(0))  # as a ZeRO-3 shard looks locally
    size = update_size(find_lora_layers(model))
    assert size.layers == 1


# -- the detector through the plugin's hooks ---------------------------------------------


def test_small_alpha_and_a_full_fine_tuning_rate_are_named_once_with_the_fix():
    model = TinyLoraModel(r=64, alpha=1)
    model.nudge_adapters(1e-5)  # trained, but by almost nothing
    manager = configured({"diagnostics": {"lora_inert_steps": 3, "stall_steps": 5}}, model)

    assert log(manager, 1) == [] and log(manager, 2, rewards=(1e-5, -2e-5)) == []
    findings = log(manager, 3)
    assert codes(findings) == ["lora-inert"]
    finding = findings[0]
    assert finding.severity.value == "warning"
    assert "r=64, lora_alpha=1 (effective scaling 0.0156) on 2 layers" in finding.message
    assert "learning rate 5e-06" in finding.message
    assert "||scaling*B@A||/||W|| median" in finding.message
    assert "raise lora_alpha to r or 2r" in finding.fix and "0.0156" in finding.fix
    assert "~0.0001..0.0002" in finding.fix and "instead of 5e-06" in finding.fix
    # Once per run, and the ln 2 stall (its threshold passes at step 5) adds no generic check-list on top.
    assert [codes(log(manager, step)) for step in range(4, 8)] == [[]] * 4


def test_adapters_that_never_changed_point_at_gradients_not_at_alpha():
    manager = configured({"diagnostics": {"lora_inert_steps": 2}}, TinyLoraModel(r=8, alpha=16))
    log(manager, 1, learning_rate=1e-4)
    [finding] = log(manager, 2, learning_rate=1e-4)
    assert "have not changed at all" in finding.message
    assert "require grad" in finding.fix and "identical chosen/rejected" in finding.fix


def test_well_configured_adapters_that_move_the_weights_but_not_the_outputs_are_reported_as_inactive():
    model = TinyLoraModel(r=8, alpha=16)
    model.nudge_adapters(0.05)
    manager = configured({"diagnostics": {"lora_inert_steps": 2}}, model)
    log(manager, 1, learning_rate=1e-4)
    [finding] = log(manager, 2, learning_rate=1e-4)
    assert "may not be active" in finding.message and "set_adapter" in finding.fix
    assert "lora_alpha" not in finding.fix


def test_moving_rewards_reset_the_count_and_warm_up_steps_do_not_count():
    manager = configured({"diagnostics": {"lora_inert_steps": 2}}, TinyLoraModel())
    log(manager, 1, learning_rate=1e-6)
    assert log(manager, 2, rewards=(0.05, -0.04), learning_rate=1e-6) == []  # the adapter did something
    assert log(manager, 3, learning_rate=1e-6) == []
    assert log(manager, 4, learning_rate=2e-6) == []  # warm-up: the rate is still rising
    assert log(manager, 5, learning_rate=3e-6) == []
    assert codes(log(manager, 6, learning_rate=3e-6)) == ["lora-inert"]


def test_the_learning_rate_named_is_the_one_set_not_the_decayed_one():
    model = TinyLoraModel(r=64, alpha=1)
    model.nudge_adapters(1e-6)
    manager = configured({"diagnostics": {"lora_inert_steps": 3}}, model)
    log(manager, 1, learning_rate=5e-7), log(manager, 2, learning_rate=3e-7)
    [finding] = log(manager, 3, learning_rate=1e-7)
    assert "learning rate 5e-07 (largest logged)" in finding.message and "instead of 5e-07" in finding.fix


def test_a_run_without_lora_gets_no_lora_finding_and_the_ln2_stall_as_before():
    manager = configured({"diagnostics": {"lora_inert_steps": 2, "stall_steps": 3}}, torch.nn.Linear(4, 4))
    assert [codes(log(manager, step)) for step in (1, 2, 3)] == [[], [], ["loss-stuck-at-ln2"]]


def test_a_peft_run_whose_layers_cannot_be_read_is_still_reported_without_the_settings():
    manager = configured({"diagnostics": {"lora_inert_steps": 1}}, torch.nn.Linear(4, 4), uses_peft=True)
    [finding] = log(manager, 1)
    assert "LoRA settings unknown" in finding.message and "learning rate 5e-06" in finding.message


def test_the_count_survives_a_resume_from_the_plugin_state():
    config = {"diagnostics": {"lora_inert_steps": 3}}
    before = configured(config, TinyLoraModel())
    log(before, 1), log(before, 2)
    [(key, state)] = [entry for entry in before.hook.vlm_dpo_state_dict() if entry[0] == "diagnostics"]
    assert state["lora_inert"]["inert_logs"] == 2

    resumed = configured(config, TinyLoraModel())
    resumed.hook.vlm_dpo_load_state_dict(states={key: state})
    assert codes(log(resumed, 3)) == ["lora-inert"]


def test_an_older_checkpoint_without_lora_state_loads():
    manager = configured({}, TinyLoraModel())
    manager.hook.vlm_dpo_load_state_dict(states={"diagnostics": {"stalled_logs": 4, "warned": []}})
    assert manager.get_plugin("diagnostics").stalled_logs == 4


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lora_inert_steps": 0}, "'diagnostics.lora_inert_steps' is 0; expected an integer >= 1"),
        ({"lora_inert_tolerance": 0}, "'diagnostics.lora_inert_tolerance' is 0.0; expected a tolerance > 0"),
    ],
)
def test_bad_settings_name_the_key(settings, message):
    with pytest.raises(ConfigError) as error:
        configured({"diagnostics": settings})
    assert message in str(error.value)
