from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from vlm_dpo_plugins import hookimpl
from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.errors import ConfigError, PluginError
from vlm_dpo_plugins.manager import create_plugin_manager


def load(data, **plugins):
    return create_plugin_manager(load_entry_points=False, extra_plugins=plugins).load_config(data)


def test_empty_config_has_the_fixing_defaults():
    config = load({})
    assert config.freeze.trainable == ("language",)  # vision tower and projector frozen
    assert config.guards.max_grad_norm == 1.0
    assert config.guards.skip_nonfinite and config.guards.non_reentrant_checkpointing
    assert config.loss.type == "sigmoid" and config.loss.fp32_logps


@pytest.mark.parametrize(
    "data, message",
    [
        ({"gaurds": {}}, "unknown config key 'gaurds'; did you mean 'guards'?"),
        ({"guards": {"max_grad_nrom": 1.0}}, "unknown config key 'guards.max_grad_nrom'; did you mean 'guards.max_grad_norm'?"),
        (
            {"freeze": {"unfreeze": [{"at_step": 5, "vision_block": 2}]}},
            "unknown config key 'freeze.unfreeze[0].vision_block'; did you mean 'freeze.unfreeze[0].vision_blocks'?",
        ),
        ({"loss": {"beta": 0}}, "'loss.beta' is 0.0; expected beta > 0"),
        ({"loss": {"beta": "high"}}, "'loss.beta' must be float, got 'high'"),
        ({"freeze": {"trainable": ["visoin"]}}, "'freeze.trainable' has 'visoin'; expected one of"),
        ({"freeze": {"unfreeze": [{"at_step": 0}]}}, "'freeze.unfreeze[0].at_step' is 0; expected an optimizer step >= 1"),
        ({"freeze": {"unfreeze": [{"at_step": 9}, {"at_step": 3}]}}, "'freeze.unfreeze' is [9, 3]"),
        ({"guards": {"skip_nonfinite": "yes"}}, "'guards.skip_nonfinite' must be bool, got 'yes'"),
        ({"freeze": {"trainable": "language"}}, "'freeze.trainable' must be a list"),
    ],
)
def test_bad_config_names_the_key_and_the_fix(data, message):
    with pytest.raises(ConfigError) as error:
        load(data)
    assert message in str(error.value)


def test_values_are_converted_and_nested_sections_built():
    config = load(
        {
            "freeze": {"learning_rates": {"projector": "2e-5"}, "unfreeze": [{"at_step": 10, "groups": ["projector"]}]},
            "guards": {"max_grad_norm": None},
            "loss": {"beta": 1},
        }
    )
    assert config.freeze.learning_rates == {"projector": 2e-5}
    assert config.freeze.unfreeze[0].groups == ("projector",)
    assert config.guards.max_grad_norm is None
    assert isinstance(config.loss.beta, float)


def test_yaml_file_loads_and_bad_yaml_names_the_file(tmp_path):
    good = tmp_path / "plugins.yaml"
    good.write_text("loss:\n  type: hinge\n  beta: 0.2\nfreeze:\n  trainable: [language, projector]\n")
    config = create_plugin_manager(load_entry_points=False).load_config(good)
    assert (config.loss.type, config.loss.beta, config.freeze.trainable) == ("hinge", 0.2, ("language", "projector"))
    listing = tmp_path / "list.yaml"
    listing.write_text("- loss\n")
    with pytest.raises(ConfigError, match="list.yaml': expected a mapping of sections at the top level, got a list"):
        create_plugin_manager(load_entry_points=False).load_config(listing)


@dataclass
class Spike:
    factor: float = 4.0
    action: Literal["skip", "warn"] = "skip"


class SpikeSection:
    @hookimpl
    def vlm_dpo_config_sections(self):
        return {"spike": Spike}


def test_plugin_declared_section_is_validated_like_a_builtin():
    config = load({"spike": {"factor": 3, "action": "warn"}}, spike=SpikeSection())
    assert config.spike == Spike(factor=3.0, action="warn")
    assert load({}, spike=SpikeSection()).spike == Spike()
    with pytest.raises(ConfigError, match=r"'spike.action' is 'wran'; expected one of \['skip', 'warn'\]; did you mean 'warn'"):
        load({"spike": {"action": "wran"}}, spike=SpikeSection())
    with pytest.raises(ConfigError, match="unknown config key 'spike.factr'; did you mean 'spike.factor'"):
        load({"spike": {"factr": 3}}, spike=SpikeSection())


def test_the_builtin_sections_come_from_their_plugins():
    manager = create_plugin_manager(load_entry_points=False)
    assert set(manager.config_sections()) == {"freeze", "collation", "loss", "guards", "diagnostics", "sharing"}
    blocked = create_plugin_manager(load_entry_points=False, block=["guards"])
    config = blocked.load_config({})
    assert config.section("guards") is None and not hasattr(config, "guards")
    with pytest.raises(ConfigError, match=r"no section 'guards': no loaded plugin declares it \(is that plugin blocked"):
        config.guards
    with pytest.raises(ConfigError, match=r"\['guards'\] belong to no loaded plugin; blocked plugins: \['guards'\]"):
        blocked.load_config({"guards": {"max_grad_norm": 2.0}})


def test_a_section_two_plugins_declare_names_both():
    class LossSection:
        @hookimpl
        def vlm_dpo_config_sections(self):
            return {"loss": Spike}

    with pytest.raises(PluginError, match="plugins 'losses' and 'mine' both declare the config section 'loss'"):
        load({}, mine=LossSection())


def test_a_section_declared_as_something_else_than_a_dataclass_names_the_plugin():
    class Broken:
        @hookimpl
        def vlm_dpo_config_sections(self):
            return {"spike": {"factor": 4.0}}

    with pytest.raises(PluginError, match="plugin 'broken': vlm_dpo_config_sections must map section names"):
        load({}, broken=Broken())


def test_the_keys_written_in_a_hand_built_config_are_its_non_default_values():
    from vlm_dpo_plugins.config_source import load_plugin_config
    from vlm_dpo_plugins.guards.settings import GuardsConfig

    manager = create_plugin_manager(load_entry_points=False, extra_plugins={"spike": SpikeSection()})
    config, written = load_plugin_config(manager, VLMDPOConfig(guards=GuardsConfig(max_grad_norm=2.0)))
    assert written["guards"] == {"max_grad_norm"} and written["loss"] == set() and written["spike"] == set()


def test_a_hand_built_config_gets_the_sections_it_lacks():
    from vlm_dpo_plugins.guards.settings import GuardsConfig

    config = load(VLMDPOConfig(guards=GuardsConfig(max_grad_norm=2.0)))
    assert config.guards.max_grad_norm == 2.0 and config.loss.type == "sigmoid"
    with pytest.raises(ConfigError, match=r"config section\(s\) \['spike'\] belong to no loaded plugin"):
        load(VLMDPOConfig(spike=Spike()))


def test_the_readme_example_config_is_valid():
    import re
    from pathlib import Path

    import yaml

    from vlm_dpo_plugins.manager import create_plugin_manager

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = re.search(r"```yaml\n(.*?)```", readme, re.S).group(1)
    config = create_plugin_manager(load_entry_points=False).load_config(yaml.safe_load(example))
    assert config.freeze.unfreeze[0].groups == ("projector",)
