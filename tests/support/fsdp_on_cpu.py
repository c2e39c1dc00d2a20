"""accelerate's FSDP gate opened for CPU ranks: the one thing that keeps a framework's FSDP2 path off a CPU.

accelerate turns a run into FSDP only on an accelerator (``AcceleratorState`` keeps ``MULTI_CPU`` and drops the FSDP
plugin, so a CPU run silently gets DDP: ``test_on_cpu_accelerate_builds_ddp_where_trl_is_asked_for_fsdp2``).
``open_gate()`` lets a CPU state with an FSDP plugin become FSDP, as a GPU state does; nothing after it changes:
accelerate's own ``fully_shard`` wrapping, the Trainer's loop and its sharded checkpoints run as they run on GPUs,
over gloo. Tests import it in their rank processes; on a GPU nothing needs it.
"""

from __future__ import annotations

import functools


def open_gate() -> None:
    from accelerate import state
    from accelerate.utils import DistributedType

    stock_init = state.AcceleratorState.__init__
    if getattr(stock_init, "opens_fsdp_on_cpu", False):
        return

    @functools.wraps(stock_init)
    def init(self, *args, fsdp_plugin=None, **kwargs):
        stock_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init.opens_fsdp_on_cpu = True
    state.AcceleratorState.__init__ = init


def gate_env(folder) -> dict[str, str]:
    """Environment for a framework's CLI whose processes (torchrun's ranks too) open the gate at start-up."""
    from framework_cli import gate_opened_at_startup

    return gate_opened_at_startup(folder, "fsdp_on_cpu")
