"""An FSDP2 sharded checkpoint's optimizer state, loaded by the accelerate releases that save it and cannot read it.

accelerate up to 1.11 (the newest LLaMA-Factory 0.9.5 allows) saves an FSDP2 ``SHARDED_STATE_DICT`` optimizer
with torch's ``get_optimizer_state_dict`` (entries named by parameter), but loads it into
``optimizer.state_dict()`` (entries numbered) as the template of what to read. A resumed AdamW has taken no step
yet, so that template is empty, nothing is read, and the moments and step counts restart at zero without a word:
the first step after the resume is a fresh AdamW's (on the tiny LLaVA every weight lands up to 1.7 learning
rates away from the uninterrupted run's; stock LLaMA-Factory the same). Later accelerate releases load with the
template the save used. The shared step does that for every release: while the Trainer resumes an FSDP2 sharded
checkpoint, accelerate's loader is swapped for one that reads into ``get_optimizer_state_dict`` (every
parameter's state made first) and hands the result to ``set_optimizer_state_dict``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

OPTIMIZER_FOLDER = "optimizer"
"""accelerate's name for the optimizer's distributed-checkpoint folder, ``optimizer_<index>``."""


def loads_fsdp2_sharded_optimizer(trainer: Any) -> bool:
    """Whether the Trainer's resume reads the optimizer from an FSDP2 sharded (distributed) checkpoint."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return False
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    return getattr(plugin, "fsdp_version", 1) == 2 and "SHARDED" in str(getattr(plugin, "state_dict_type", ""))


@contextlib.contextmanager
def sharded_optimizer_read_by_name() -> Iterator[None]:
    """While it lasts, the Trainer's ``load_fsdp_optimizer`` reads an FSDP2 sharded optimizer by parameter name."""
    import transformers.trainer as trainer_module

    from vlm_dpo_plugins.adapters.hf_trainer.activation import patched

    with patched(trainer_module, load_fsdp_optimizer=load_fsdp2_sharded_optimizer):
        yield


def load_fsdp2_sharded_optimizer(
    fsdp_plugin: Any, accelerator: Any, optimizer: Any, model: Any, input_dir: str, optimizer_index: int = 0, **_: Any
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    accelerator.wait_for_everyone()
    inner = getattr(optimizer, "optimizer", optimizer)
    options = StateDictOptions(cpu_offload=getattr(fsdp_plugin.state_dict_config, "offload_to_cpu", False))
    folder = input_dir
    if OPTIMIZER_FOLDER not in os.path.basename(input_dir):
        folder = os.path.join(input_dir, f"{OPTIMIZER_FOLDER}_{optimizer_index}")
    state = {"optimizer": get_optimizer_state_dict(model, inner, options=options)}
    dcp.load(state_dict=state, storage_reader=dcp.FileSystemReader(folder))
    set_optimizer_state_dict(model, inner, state["optimizer"], options=options)
