"""A third-party plugin that adds one loss variant and does nothing else: no ``vlm_dpo_compute_loss`` of its own.

``doubled_sigmoid`` is twice the sigmoid DPO loss, so at step 0, where the policy equals its reference, every
pair's loss is 2 ln 2: a run that trains with it shows the registered function was called, in any framework. Its
one term, ``doubled/dpo_loss`` (ln 2 at step 0), is a metric name no built-in variant logs.
``install(directory)`` makes it an installed entry point for a framework's CLI in a subprocess.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

from vlm_dpo_plugins import hookimpl
from vlm_dpo_plugins.types import LossOutput

ENTRY_POINT_NAME = "test_doubled_sigmoid"
VARIANT = "doubled_sigmoid"
TERM = "doubled/dpo_loss"


def doubled_sigmoid(logps, config) -> LossOutput:
    chosen_ratio = logps.chosen.float() - logps.ref_chosen.float()
    rejected_ratio = logps.rejected.float() - logps.ref_rejected.float()
    losses = -2 * F.logsigmoid(config.beta * (chosen_ratio - rejected_ratio))
    term = {TERM: (losses / 2).mean().item()}
    return LossOutput(losses, (config.beta * chosen_ratio).detach(), (config.beta * rejected_ratio).detach(), term)


class DoubledSigmoid:
    @hookimpl
    def vlm_dpo_loss_functions(self):
        return {VARIANT: doubled_sigmoid}


plugin = DoubledSigmoid()


def install(directory: Path) -> dict[str, str]:
    """Make this plugin an installed entry point for a subprocess; returns the environment to pass to it."""
    from plugin_install import install_as_entry_point  # the test process only: this file runs alone when installed

    return install_as_entry_point(__file__, directory, "vlm_dpo_test_variant_plugin", ENTRY_POINT_NAME)
