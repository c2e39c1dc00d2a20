"""A third-party plugin that injects one kind of fault at chosen optimizer steps, for the reliability suites.

Faults (``FAULTS``), each at the start of the optimizer steps named (0-based, the Trainer's ``global_step``):

- ``loss-nan`` / ``loss-inf``: the loss the plugins computed becomes NaN / +Inf (its gradients stay finite, so
  only the loss check can see it);
- ``grad-nan`` / ``grad-inf``: one trainable parameter's gradient is filled with NaN / +Inf during backward;
- ``logits-nan``: the logits of one sequence (the batch's first row; with TRL's fused LM head, its per-token
  log-probs) are NaN in every forward pass of the step;
- ``pixel-nan``: ``pixel_values`` are NaN on their way into the model, so the vision tower encodes NaN;
- ``spike``: the loss is multiplied by ``SPIKE_FACTOR`` (its gradients too), as a sudden hard batch would.

Besides one of those, a run can be killed (SIGKILL, as a preempted node or the OOM killer would) at one step:
``kill="step"`` during that step's backward pass, ``kill="save"`` while the checkpoint after that step is being
written (the moment the Trainer saves the optimizer, after the weights).

In-process (the TRL adapter) register ``FaultInjector(...)`` in the run's plugin manager. A framework's CLI runs
in a subprocess, so there the module is installed the way any third-party plugin is: ``install(directory, ...)``
writes it next to a ``*.dist-info`` folder whose ``entry_points.txt`` registers it in the ``vlm_dpo_plugins``
group, and returns the environment that puts the folder on the subprocess's ``sys.path``, loads only this entry
point and names the fault. Every injection prints one ``[test_fault_injection]`` line, so a test can tell a fault
that was handled from one that never fired.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
from collections.abc import Iterable
from pathlib import Path

import torch

from vlm_dpo_plugins import hookimpl
from vlm_dpo_plugins.distributed import rank as current_rank

FAULT_VARIABLE = "VLM_DPO_TEST_FAULT"
STEPS_VARIABLE = "VLM_DPO_TEST_FAULT_STEPS"
RANK_VARIABLE = "VLM_DPO_TEST_FAULT_RANK"
KILL_VARIABLE = "VLM_DPO_TEST_KILL"  # "step:3" or "save:3"
ENTRY_POINT_NAME = "test_fault_injection"
SPIKE_FACTOR = 50.0

LOSS_FAULTS = {"loss-nan": math.nan, "loss-inf": math.inf}
GRADIENT_FAULTS = {"grad-nan": math.nan, "grad-inf": math.inf}
FAULTS = (*LOSS_FAULTS, *GRADIENT_FAULTS, "logits-nan", "pixel-nan", "spike")
KILLS = ("step", "save")


def random_step(seed: int, first: int, last: int) -> int:
    """A step in [first, last] drawn from ``seed``: the suites inject at a random step reproducibly."""
    return random.Random(seed).randint(first, last)


def _kill(reason: str) -> None:
    print(f"[test_fault_injection] SIGKILL {reason}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class FaultInjector:
    def __init__(
        self, fault: str, steps: Iterable[int], only_rank: int | None = None, kill: tuple[str, int] | None = None
    ) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {list(FAULTS)}")
        if kill is not None and kill[0] not in KILLS:
            raise ValueError(f"unknown kill {kill[0]!r}; expected one of {list(KILLS)}")
        self.fault = fault
        self.steps = frozenset(steps)
        self.only_rank = only_rank
        self.kill = kill
        self.armed_step: int | None = None
        self.handles: list = []
        self.injected: list[int] = []

    def _report(self, detail: str) -> None:
        if self.armed_step not in self.injected:
            self.injected.append(self.armed_step)
            print(f"[test_fault_injection] {self.fault} at step {self.armed_step}: {detail}", flush=True)

    @hookimpl
    def vlm_dpo_step_begin(self, step: int, model: torch.nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.armed_step = None
        if self.only_rank is not None and current_rank() != self.only_rank:
            return
        if self.kill is not None and self.kill[1] == step:
            self._arm_kill(step, model)
        if step not in self.steps:
            return
        self.armed_step = step
        if self.fault in GRADIENT_FAULTS:
            name, parameter = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
            value = GRADIENT_FAULTS[self.fault]
            self.handles.append(parameter.register_hook(lambda grad: self._poison_gradient(grad, name, value)))
        elif self.fault == "logits-nan":
            self.handles.append(model.register_forward_hook(self._poison_logits))
        elif self.fault == "pixel-nan":
            # prepend: ms-swift's own pre-hook turns pixel_values into input embeddings on the same module.
            self.handles.append(model.register_forward_pre_hook(self._poison_pixels, with_kwargs=True, prepend=True))

    def _arm_kill(self, step: int, model: torch.nn.Module) -> None:
        if self.kill[0] == "step":
            parameter = next(p for p in model.parameters() if p.requires_grad)
            self.handles.append(parameter.register_hook(lambda grad: _kill(f"during the backward pass of step {step}")))
            return
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if str(f).endswith("optimizer.pt"):
                _kill(f"while saving {f}, after step {step}")
            return real_save(obj, f, *args, **kwargs)

        torch.save = save  # the process dies in it: nothing to restore

    def _poison_gradient(self, grad: torch.Tensor, name: str, value: float) -> torch.Tensor:
        self._report(f"{value} gradient for {name}")
        return torch.full_like(grad, value)

    def _poison_logits(self, module, args, output):
        # TRL 1.16's fused LM head returns per-token log-probs instead of logits: the same sequence poisoned there.
        for field in ("logits", "log_probs"):
            values = getattr(output, field, None)
            if values is None:
                continue
            first_row = torch.zeros(values.shape[0], *([1] * (values.dim() - 1)), dtype=torch.bool)
            first_row[0] = True
            setattr(output, field, values.masked_fill(first_row.to(values.device), math.nan))
            self._report(f"NaN {field} in row 0 of {values.shape[0]}")
            break
        return output

    def _poison_pixels(self, module, args, kwargs):
        pixels = kwargs.get("pixel_values")
        if pixels is None:
            return None
        kwargs["pixel_values"] = torch.full_like(pixels, math.nan)
        self._report(f"NaN pixel_values {tuple(pixels.shape)}")
        return args, kwargs

    @hookimpl(wrapper=True)
    def vlm_dpo_compute_loss(self, logps, config):
        result = yield
        if result is None or self.armed_step is None or self.fault not in (*LOSS_FAULTS, "spike"):
            return result
        if self.fault == "spike":
            self._report(f"loss x {SPIKE_FACTOR:g}")
            return dataclasses.replace(result, losses=result.losses * SPIKE_FACTOR)
        self._report(f"{LOSS_FAULTS[self.fault]} loss")
        return dataclasses.replace(result, losses=result.losses + LOSS_FAULTS[self.fault])


def _from_environment() -> FaultInjector:
    steps = [int(step) for step in os.environ.get(STEPS_VARIABLE, "").split(",") if step.strip()]
    only_rank = os.environ.get(RANK_VARIABLE)
    kill = os.environ.get(KILL_VARIABLE)
    return FaultInjector(
        os.environ.get(FAULT_VARIABLE, "grad-nan"),
        steps,
        None if only_rank is None else int(only_rank),
        None if kill is None else (kill.split(":")[0], int(kill.split(":")[1])),
    )


plugin = _from_environment()


def install(
    directory: Path,
    step: int | None = None,
    *,
    fault: str = "grad-nan",
    steps=(),
    only_rank: int | None = None,
    kill: tuple[str, int] | None = None,
) -> dict[str, str]:
    """Make this plugin loadable in a subprocess; returns the environment variables to pass to it."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; expected one of {list(FAULTS)}")
    steps = [*([] if step is None else [step]), *steps]
    from plugin_install import install_as_entry_point  # the test process only: this file runs alone when installed

    environment = {
        **install_as_entry_point(__file__, directory, "vlm_dpo_test_fault_plugin", ENTRY_POINT_NAME),
        FAULT_VARIABLE: fault,
        STEPS_VARIABLE: ",".join(map(str, steps)),
    }
    if only_rank is not None:
        environment[RANK_VARIABLE] = str(only_rank)
    if kill is not None:
        environment[KILL_VARIABLE] = f"{kill[0]}:{kill[1]}"
    return environment
