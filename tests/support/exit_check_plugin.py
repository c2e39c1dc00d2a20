"""A third-party plugin that reports, at interpreter exit, whether a DDP wrapper outlived the training run.

The two-rank crash at exit (``terminate called without an active exception``, about one run in twenty) came
from the teardown order, not from timing: the plugin trainer sits in reference cycles, so its
``DistributedDataParallel`` wrapper, whose Reducer holds the gloo process group, was left to the garbage
collector at interpreter shutdown, after the framework's ``destroy_process_group()``, and a process group left
for interpreter shutdown (ms-swift never destroys it) aborted the same way. Whether a wrapper or the process
group is still alive when the last ``atexit`` handlers run is deterministic, so the two-rank tests check that
instead of hoping for the rare abort. Installed like any third-party plugin (``install(directory)``), it
registers its ``atexit`` handler when training ends and prints one ``[exit_check]`` line per rank.
"""

from __future__ import annotations

import atexit
import gc
from collections.abc import Mapping
from pathlib import Path

from vlm_dpo_plugins import hookimpl

ENTRY_POINT_NAME = "test_exit_check"
LINE = "[exit_check] rank {rank}: {alive} DDP wrapper(s) alive at interpreter exit, process group initialized: {pg}"


def live_ddp_wrappers() -> int:
    from torch.nn.parallel import DistributedDataParallel

    return sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects())


def initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


class ExitCheck:
    @hookimpl
    def vlm_dpo_train_end(self, context, metrics: Mapping[str, float]) -> None:
        rank = context.rank
        # Registered before the adapter's teardown handler (``train()`` has not returned yet), so it runs after it:
        # what interpreter shutdown is left with.
        atexit.register(lambda: print(LINE.format(rank=rank, alive=live_ddp_wrappers(), pg=initialized()), flush=True))


plugin = ExitCheck()


def install(directory: Path) -> dict[str, str]:
    """Make this plugin loadable in a subprocess; returns the environment variables to pass to it."""
    from plugin_install import install_as_entry_point  # the test process only: this file runs alone when installed

    return install_as_entry_point(__file__, directory, "vlm_dpo_test_exit_check", ENTRY_POINT_NAME)


def expected_lines(world_size: int = 2) -> list[str]:
    return [LINE.format(rank=rank, alive=0, pg=False) for rank in range(world_size)]
