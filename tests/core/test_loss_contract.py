"""The loss hooks' contract: a variant registered alone trains, extras come from declared rows, unique state keys."""

from __future__ import annotations

import pytest
import torch

from vlm_dpo_plugins import hookimpl
from vlm_dpo_plugins.errors import PluginError
from vlm_dpo_plugins.losses.compute import compute_preference_loss
from vlm_dpo_plugins.losses.extra_rows import ExtraRows, extend_batch, resolve
from vlm_dpo_plugins.losses.logprobs import SequenceLogps
from vlm_dpo_plugins.losses.mdpo import CORRUPTED_IMAGE_ROWS
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import LossInputs, LossOutput

POLICY = SequenceLogps(torch.tensor([-1.0, -2.0, -3.0, -5.0]), torch.tensor([3, 3, 3, 3]))
REFERENCE = SequenceLogps(torch.tensor([-1.5, -2.0, -3.0, -4.0]), torch.tensor([3, 3, 3, 3]))


class HalfMarginLoss:
    """A third-party variant that only registers its function: no vlm_dpo_compute_loss of its own."""

    @hookimpl
    def vlm_dpo_loss_functions(self):
        def half_margin(logps, config):
            margin = (logps.chosen - logps.ref_chosen) - (logps.rejected - logps.ref_rejected)
            return LossOutput(-0.5 * margin, logps.chosen * 0, logps.rejected * 0)

        return {"half_margin": half_margin}


def test_a_variant_registered_only_by_its_function_computes_the_loss():
    manager = create_plugin_manager(load_entry_points=False, extra_plugins={"half": HalfMarginLoss()})
    config = manager.load_config({"loss": {"type": "half_margin"}})
    output, _ = compute_preference_loss(manager, config, POLICY, REFERENCE, pairs=2)
    # margins: (-1 + 1.5) - (-3 + 3) = 0.5 and (-2 + 2) - (-5 + 4) = 1.0
    assert output.losses.tolist() == [-0.25, -0.5]


def test_a_wrapper_of_compute_loss_sees_a_registry_only_variant():
    class Doubler:
        @hookimpl(wrapper=True)
        def vlm_dpo_compute_loss(self, logps, config):
            result = yield
            return LossOutput(result.losses * 2, result.chosen_rewards, result.rejected_rewards)

    plugins = {"half": HalfMarginLoss(), "doubler": Doubler()}
    manager = create_plugin_manager(load_entry_points=False, extra_plugins=plugins)
    config = manager.load_config({"loss": {"type": "half_margin"}})
    output, _ = compute_preference_loss(manager, config, POLICY, REFERENCE, pairs=2)
    assert output.losses.tolist() == [-0.5, -1.0]


def test_an_extras_key_nobody_provides_rows_for_is_named():
    manager = create_plugin_manager(load_entry_points=False)
    with pytest.raises(
        PluginError, match=r"loss.type 'mine' reads PreferenceLogps.extras\['no_image'\], but no plugin"
    ):
        resolve(manager, LossInputs(extras=("no_image",)), "mine")


def test_mdpo_extras_resolve_to_one_block_of_corrupted_image_rows():
    manager = create_plugin_manager(load_entry_points=False)
    needs = manager.hook.vlm_dpo_loss_inputs(loss_type="mdpo")
    assert resolve(manager, needs, "mdpo") == (CORRUPTED_IMAGE_ROWS,)


def test_extra_rows_are_appended_along_each_tensors_row_dimension():
    batch = {
        "input_ids": torch.tensor([[1, 2], [3, 4]]),
        "pixel_values": torch.ones(2, 3),
        "position_ids": torch.arange(12).reshape(3, 2, 2),  # M-RoPE: [3, rows, length]
    }
    extended = extend_batch(batch, [CORRUPTED_IMAGE_ROWS])
    assert extended["input_ids"].tolist() == [[1, 2], [3, 4], [1, 2]]
    assert extended["pixel_values"].tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert extended["position_ids"].shape == (3, 3, 2)
    assert torch.equal(extended["position_ids"][:, 2], batch["position_ids"][:, 0])


def test_a_second_block_of_rows_is_built_from_the_pairs_not_from_the_first_block():
    def rejected_again(batch, dims):
        return {"input_ids": batch["input_ids"][1:]}

    block = ExtraRows("rejected-again", rejected_again, policy_key="again")
    extended = extend_batch({"input_ids": torch.tensor([[1], [2]])}, [block, block])
    assert extended["input_ids"].flatten().tolist() == [1, 2, 2, 2]


class StateUnder:
    def __init__(self, key):
        self.key = key

    @hookimpl
    def vlm_dpo_state_dict(self):
        return self.key, {"count": 1}


def test_two_plugins_saving_under_one_key_is_an_error_naming_both():
    plugins = {"first": StateUnder("shared"), "second": StateUnder("shared")}
    manager = create_plugin_manager(load_entry_points=False, extra_plugins=plugins)
    with pytest.raises(PluginError, match=r"plugins '\w+' and '\w+' both save their checkpoint state under the key"):
        manager.collect_states()


def test_every_plugins_state_is_collected_under_its_key():
    manager = create_plugin_manager(load_entry_points=False, extra_plugins={"mine": StateUnder("mine")})
    states = manager.collect_states()
    assert states["mine"] == {"count": 1}
    assert {"guards", "collation", "diagnostics"} <= set(states)


def test_a_state_that_is_not_a_key_and_value_is_named():
    class Broken:
        @hookimpl
        def vlm_dpo_state_dict(self):
            return {"count": 1}

    manager = create_plugin_manager(load_entry_points=False, extra_plugins={"broken": Broken()})
    with pytest.raises(PluginError, match=r"plugin 'broken': vlm_dpo_state_dict returned dict"):
        manager.collect_states()
