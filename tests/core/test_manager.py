"""The plugin manager: built-ins, real entry points, the environment switches, hook validation, the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from distributions import install_distribution

from vlm_dpo_plugins import hookimpl
from vlm_dpo_plugins.cli import main
from vlm_dpo_plugins.errors import ConfigError, PluginError
from vlm_dpo_plugins.manager import BLOCK_PLUGINS_ENV, LOAD_PLUGINS_ENV, create_plugin_manager
from vlm_dpo_plugins.types import PreferenceLogps

BUILTINS = ["freeze", "collation", "losses", "guards", "deepspeed", "diagnostics", "sharing", "loss-registry"]
THIRD_PARTY_PLUGIN = textwrap.dedent(
    """
    import torch
    from vlm_dpo_plugins import hookimpl
    from vlm_dpo_plugins.types import LossOutput

    CALLS = []

    def doubled_sigmoid(logps, config):
        margin = (logps.chosen - logps.ref_chosen) - (logps.rejected - logps.ref_rejected)
        CALLS.append(float(margin.sum()))
        losses = -2 * torch.nn.functional.logsigmoid(config.beta * margin)
        return LossOutput(losses, logps.chosen * 0, logps.rejected * 0)

    @hookimpl
    def vlm_dpo_loss_functions():
        return {"doubled_sigmoid": doubled_sigmoid}

    @hookimpl
    def vlm_dpo_compute_loss(logps, config):
        if config.loss.type == "doubled_sigmoid":
            return doubled_sigmoid(logps, config.loss)
    """
)


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    (tmp_path / "vlm_dpo_doubled.py").write_text(THIRD_PARTY_PLUGIN)
    install_distribution(tmp_path, "vlm-dpo-doubled", "1.2.3", "doubled = vlm_dpo_doubled", monkeypatch)
    yield "doubled"
    sys.modules.pop("vlm_dpo_doubled", None)


def one_pair(margin: float):
    import torch

    t = lambda value: torch.tensor([value])  # noqa: E731
    return PreferenceLogps(chosen=t(margin), rejected=t(0.0), ref_chosen=t(0.0), ref_rejected=t(0.0))


def test_builtins_are_registered_explicitly_with_their_hooks():
    manager = create_plugin_manager(load_entry_points=False)
    infos = {info.name: info for info in manager.list_plugins()}
    assert list(infos) == BUILTINS
    assert all(info.source == "builtin" for info in infos.values())
    assert "vlm_dpo_skip_step_reason" in infos["guards"].hooks
    assert "vlm_dpo_classify_parameters" in infos["freeze"].hooks


def test_entry_point_plugin_is_loaded_and_called(installed_plugin):
    manager = create_plugin_manager()
    info = {i.name: i for i in manager.list_plugins()}[installed_plugin]
    assert info.source == "entry point, vlm-dpo-doubled 1.2.3"
    config = manager.load_config({"loss": {"type": "doubled_sigmoid", "beta": 0.1}})
    output = manager.hook.vlm_dpo_compute_loss(logps=one_pair(1.5), config=config)
    assert sys.modules["vlm_dpo_doubled"].CALLS == [1.5]
    assert float(output.losses) == pytest.approx(2 * 0.6210, abs=1e-4)


@pytest.mark.parametrize(
    "allow, loaded", [("", False), ("none", False), ("doubled", True), ("doubled,guards", True), (None, True)]
)
def test_load_plugins_env_is_an_allow_list(installed_plugin, monkeypatch, allow, loaded):
    if allow is not None:
        monkeypatch.setenv(LOAD_PLUGINS_ENV, allow)
    manager = create_plugin_manager()
    assert manager.has_plugin(installed_plugin) is loaded


def test_an_unknown_name_in_the_load_list_is_an_error_listing_the_installed_ones(installed_plugin, monkeypatch):
    monkeypatch.setenv(LOAD_PLUGINS_ENV, "doubled, dubled, other")
    with pytest.raises(PluginError) as error:
        create_plugin_manager()
    assert str(error.value) == (
        "VLM_DPO_LOAD_PLUGINS names ['dubled', 'other'], which no installed plugin entry point is called; entry "
        "points in the 'vlm_dpo_plugins' group: doubled. Fix the names, or install the plugin"
    )


def test_block_env_blocks_builtins_and_entry_points(installed_plugin, monkeypatch):
    monkeypatch.setenv(BLOCK_PLUGINS_ENV, "guards, doubled")
    manager = create_plugin_manager()
    names = [info.name for info in manager.list_plugins()]
    assert "guards" not in names and installed_plugin not in names
    assert manager.hook.vlm_dpo_gradient_checkpointing_kwargs(context=None) is None


def test_unknown_loss_type_lists_registered_variants_and_suggests():
    manager = create_plugin_manager(load_entry_points=False)
    with pytest.raises(ConfigError) as error:
        manager.load_config({"loss": {"type": "sigmod"}})
    message = str(error.value)
    assert message.startswith("'loss.type' is 'sigmod'; registered variants: [") and message.endswith("did you mean 'sigmoid'?")
    assert all(f"'{name}'" in message for name in ("sigmoid", "hinge", "ipo"))


def test_misspelled_hook_fails_loudly():
    class Typo:
        @hookimpl
        def vlm_dpo_skip_step_reasons(self, signals):
            return "never called"

    with pytest.raises(PluginError, match="vlm_dpo_skip_step_reasons"):
        create_plugin_manager(load_entry_points=False, extra_plugins={"typo": Typo()})


def test_broken_entry_point_names_plugin_and_the_way_out(tmp_path, monkeypatch):
    install_distribution(tmp_path, "broken", "0.1", "broken = no_such_module_here", monkeypatch)
    with pytest.raises(PluginError, match=r"plugin 'broken' from broken 0.1 .* failed to import.*VLM_DPO_LOAD_PLUGINS"):
        create_plugin_manager()


def test_plugins_command_lists_builtins_and_hooks(capsys, monkeypatch):
    monkeypatch.setenv(LOAD_PLUGINS_ENV, "none")
    assert main(["plugins"]) == 0
    output = capsys.readouterr().out
    for name in BUILTINS:
        assert f"{name}  (builtin)" in output
    assert "    vlm_dpo_compute_loss" in output


def test_console_script_is_installed():
    executable = Path(sys.executable).parent / "vlm-dpo"
    assert executable.exists(), "no vlm-dpo console script beside the interpreter; is the package installed?"
    result = subprocess.run([str(executable), "plugins"], capture_output=True, text=True, check=True)
    assert "guards  (builtin)" in result.stdout
