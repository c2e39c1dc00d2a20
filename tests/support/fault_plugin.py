"""A third-party plugin that poisons one gradient at a chosen optimizer step, for framework CLI runs.

A framework's CLI runs in a subprocess, so a test cannot attach a callback to its trainer.
Instead this module is installed the way any third-party plugin is: ``install(directory)``
writes it next to a ``*.dist-info`` folder whose ``entry_points.txt`` registers it in the
``vlm_dpo_plugins`` group, and returns the environment that puts the folder on the
subprocess's ``sys.path`` and loads only this entry point. Inside the run, at the start
of optimizer step ``VLM_DPO_TEST_FAULT_STEP`` (0-based, the Trainer's ``global_step``), a
tensor hook fills the gradient of the first trainable parameter with NaN during that
step's backward pass; the hook is removed at the next step.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch

from vlm_dpo_plugins import hookimpl

STEP_VARIABLE = "VLM_DPO_TEST_FAULT_STEP"
ENTRY_POINT_NAME = "test_fault_injection"


class GradientFault:
    def __init__(self) -> None:
        self.handle = None

    @hookimpl
    def vlm_dpo_step_begin(self, step: int, model: torch.nn.Module) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if step != int(os.environ.get(STEP_VARIABLE, "-1")):
            return
        name, parameter = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
        self.handle = parameter.register_hook(lambda grad: torch.full_like(grad, math.nan))
        print(f"[test_fault_injection] NaN gradient for {name} at step {step}", flush=True)


plugin = GradientFault()


def install(directory: Path, step: int) -> dict[str, str]:
    """Make this plugin loadable in a subprocess; returns the environment variables to pass to it."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, directory / "vlm_dpo_test_fault_plugin.py")
    dist_info = directory / "vlm_dpo_test_fault_plugin-0.0.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: vlm-dpo-test-fault-plugin\nVersion: 0.0\n")
    (dist_info / "entry_points.txt").write_text(
        f"[vlm_dpo_plugins]\n{ENTRY_POINT_NAME} = vlm_dpo_test_fault_plugin:plugin\n"
    )
    python_path = os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": python_path, "VLM_DPO_LOAD_PLUGINS": ENTRY_POINT_NAME, STEP_VARIABLE: str(step)}
