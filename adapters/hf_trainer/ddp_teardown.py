"""The DDP wrapper released when ``train()`` returns, while the process group it holds is still alive.

Why: ``DistributedDataParallel`` owns a C++ ``Reducer`` that holds the process group (gloo: its worker threads and
its transport's loop thread). The plugin trainer is part of reference cycles (its callbacks, the guarded
optimizer step and the hooks point back at it), so when the framework's training function returns, the trainer,
and the DDP wrapper it keeps in ``model_wrapped`` and ``accelerator._models``, are not freed by reference counting
as a stock trainer is: they live until the garbage collector runs, in practice during interpreter shutdown. By
then LLaMA-Factory has called ``destroy_process_group()`` and the gloo backend survives only inside the Reducer,
to be torn down, threads and all, while the interpreter finalizes; about one two-rank run in twenty then died
there with ``terminate called without an active exception`` (SIGABRT, torchrun exit 1), after training and
saving had finished. ms-swift, which leaves the process group to interpreter shutdown, tore both down in
whatever order the collector picked.

Releasing the wrapper when ``train()`` returns gives every run the stock order: the Reducer goes first, with the
process group still registered, and the process group is destroyed afterwards, by the framework or at exit, as
in a run without the plugins. The release is local to each rank (no collective: a rank whose training raised must
not wait for the others), every rank does it at the same moment of its own run, and nothing after ``train()``
needs the wrapper: saving and evaluation use the unwrapped model, and a second ``train()`` wraps it again.

That alone was not enough under ms-swift, which never destroys its process group: 2 of 50 two-rank runs still
aborted the same way, on the main thread, during interpreter shutdown. A gloo process group torn down while the
interpreter finalizes is the failure torch's own tracker describes (pytorch#65231, pytorch#190489); the fix
upstream proposed (pytorch#179291) is to destroy it before then. So once ``train()`` has returned normally on a
rank, an ``atexit`` handler does that: it collects what is unreachable (the plugin trainer's cycles) while every
module and thread is still alive, then destroys the process group if the framework left it initialized
(LLaMA-Factory already did: nothing to do). ``atexit`` handlers run after the framework's code, whether it ended
normally or raised, before interpreter shutdown, and do not change the exit status; a rank whose ``train()``
raised registers nothing, so it never waits on a process group that may have work in flight.
"""

from __future__ import annotations

import atexit
import gc
import logging
import weakref
from typing import Any

from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger("vlm_dpo_plugins.adapters")
_exit_teardown_registered = False


def release_ddp_wrapper(trainer: Any) -> bool:
    """Drop the trainer's references to its DDP wrapper so the wrapper (and its Reducer) is freed now.

    Returns whether a wrapper was freed. A DeepSpeed engine or FSDP module is left alone: their wrappers hold the
    parameters themselves and the frameworks save through them.
    """
    wrapper = getattr(trainer, "model_wrapped", None)
    if not isinstance(wrapper, DistributedDataParallel):
        return False
    if trainer.model is wrapper:
        trainer.model = wrapper.module
    trainer.model_wrapped = trainer.model
    models = getattr(getattr(trainer, "accelerator", None), "_models", None)
    if isinstance(models, list):
        models[:] = [model.module if model is wrapper else model for model in models]
    freed = weakref.ref(wrapper)
    del wrapper
    if freed() is not None:
        gc.collect()  # the wrapper's own reference cycles, if any, need the collector
    return freed() is None


def tear_down_before_interpreter_exit() -> None:
    """Once per process, after ``train()`` returned normally: at exit, collect, then destroy the process group."""
    global _exit_teardown_registered
    if not _exit_teardown_registered:
        _exit_teardown_registered = True
        atexit.register(_before_interpreter_shutdown)


def _before_interpreter_shutdown() -> None:
    import torch.distributed as dist

    gc.collect()  # the trainer's cycles, freed while the interpreter and the process group's threads are alive
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.destroy_process_group()
    except Exception as error:  # at exit: say so, and leave the exit status to the framework
        logger.warning("vlm-dpo: destroying the process group at exit failed: %s", error)
