"""A third-party plugin that adds one loss variant and does nothing else: no ``vlm_dpo_compute_loss`` of its own.

``doubled_sigmoid`` is twice the sigmoid DPO loss, so at step 0, where the policy equals its reference, every
pair's loss is 2 ln 2: a run that trains with it shows the registered function was called, in any framework.
``install(directory)`` makes it an installed entry point for a framework's CLI in a subprocess.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.nn.functional as F

from vlm_dpo_plugins import hookimpl
from vlm_dpo_plugins.types import LossOutput

ENTRY_POINT_NAME = "test_doubled_sigmoid"
VARIANT = "doubled_sigmoid"


def doubled_sigmoid(logps, config) -> LossOutput:
    chosen_ratio = logps.chosen.float() - logps.ref_chosen.float()
    rejected_ratio = logps.rejected.float() - logps.ref_rejected.float()
    losses = -2 * F.logsigmoid(config.beta * (chosen_ratio - rejected_ratio))
    return LossOutput(losses, (config.beta * chosen_ratio).detach(), (config.beta * rejected_ratio).detach())


class DoubledSigmoid:
    @hookimpl
    def vlm_dpo_loss_functions(self):
        return {VARIANT: doubled_sigmoid}


plugin = DoubledSigmoid()


def install(directory: Path) -> dict[str, str]:
    """Make this plugin an installed entry point for a subprocess; returns the environment to pass to it."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, directory / "vlm_dpo_test_variant_plugin.py")
    dist_info = directory / "vlm_dpo_test_variant_plugin-0.0.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: vlm-dpo-test-variant-plugin\nVersion: 0.0\n")
    (dist_info / "entry_points.txt").write_text(
        f"[vlm_dpo_plugins]\n{ENTRY_POINT_NAME} = vlm_dpo_test_variant_plugin:plugin\n"
    )
    python_path = os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": python_path, "VLM_DPO_LOAD_PLUGINS": ENTRY_POINT_NAME}
