"""A third-party test plugin that saves the whole trained model when training ends, gathered from its shards.

A sharded run's checkpoints do not always hold the weights a test compares: with FSDP2 and LoRA the base model and
the frozen parts are left out, and under ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save`` only
DeepSpeed's partitions are written. At ``vlm_dpo_train_end`` every rank takes part in the gather (FSDP2's
``get_model_state_dict``, DeepSpeed's ``GatheredParameters``: collectives) and rank 0 saves the full state dict,
in the model's own names, to ``$VLM_DPO_TEST_FULL_WEIGHTS``. Under DDP or on one process it saves the plain state
dict, so a sharded run compares with a replicated one name for name.

At ``vlm_dpo_train_begin`` each rank prints one ``[test_full_weights]`` line naming the engine the plugins saw and
FSDP's units (the wrapped classes), so a test can tell which engine really ran.

Installed the way any third-party plugin is (``install``), since the frameworks' CLIs run it in subprocesses.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vlm_dpo_plugins import hookimpl

ENTRY_POINT_NAME = "test_full_weights"
SAVED_VARIABLE = "VLM_DPO_TEST_FULL_WEIGHTS"


class FullWeights:
    model: torch.nn.Module | None = None

    @hookimpl
    def vlm_dpo_train_begin(self, model, context):
        self.model = model
        units = sorted(
            type(getattr(module, "_checkpoint_wrapped_module", module)).__name__.removeprefix("FSDP")
            for module in model.modules()
            if type(module).__name__.startswith("FSDP")
        )
        print(
            f"[test_full_weights] rank {context.rank}: fsdp_version={context.fsdp_version} "
            f"deepspeed_stage={context.deepspeed_stage} uses_peft={context.uses_peft} {type(model).__name__} "
            f"units={','.join(units)}",
            flush=True,
        )

    @hookimpl
    def vlm_dpo_train_end(self, context, metrics):
        if context.deepspeed_stage == 3:
            state = _gathered_from_zero3(self.model, context.rank)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(self.model, options=options)  # under FSDP2 a collective: every rank calls it
        if context.rank == 0:
            torch.save(state, os.environ[SAVED_VARIABLE])


def _gathered_from_zero3(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if rank != 0:
            return {}
        return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}


plugin = FullWeights()


def install(directory: Path, saved: Path, alongside: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that loads this plugin, saving to ``saved``, beside the plugins ``alongside`` loads (another
    test plugin's environment, such as ``fault_plugin.install``'s)."""
    # The test process only: this file runs alone when installed.
    from framework_cli import merged_environments
    from plugin_install import install_as_entry_point

    mine = install_as_entry_point(__file__, directory, "vlm_dpo_test_full_weights", ENTRY_POINT_NAME)
    return merged_environments(alongside or {}, mine, {SAVED_VARIABLE: str(saved)})
