"""One rank of a two-process CPU (gloo) DDP run of VLMDPOTrainer, launched by torchrun from test_ddp.py.

Rank 1 alone gets a NaN in one gradient after DDP has averaged them, at optimizer step 1:
the guards must skip that step on both ranks, or the replicas drift apart for good.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.distributed as dist
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
from vlm_dpo_plugins.adapters.trl import VLMDPOTrainer

from vlm_dpo_plugins.tiny import make_preference_examples, trl_conversational_rows


class ProjectorAtStepBegin(TrainerCallback):
    """The projector's weights at the start of each optimizer step."""

    def __init__(self):
        self.snapshots = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        inner = getattr(model, "module", model).model
        self.snapshots[state.global_step] = torch.cat(
            [p.detach().flatten().clone() for p in inner.multi_modal_projector.parameters()]
        )


class NanOnRankOne(TrainerCallback):
    """At step 1, on rank 1 (or the rank ``VLM_DPO_TEST_NAN_RANK`` names: four ranks put it on the second node)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1 and dist.get_rank() == int(os.environ.get("VLM_DPO_TEST_NAN_RANK", "1")):
            parameter = next(p for p in model.parameters() if p.grad is not None)
            parameter.grad.view(-1)[0] = math.nan


def main(model_dir: str, output_dir: str, mode: str) -> None:
    """``mode``: ``none`` (no checkpointing; the NaN on rank 1), ``reentrant`` (LoRA, reentrant checkpointing and
    find_unused_parameters, as the Qwen2.5-VL report ran it), ``stock-reentrant`` (the same with trl.DPOTrainer)."""
    gradient_checkpointing = "reentrant" if mode.endswith("reentrant") else "none"
    rows = trl_conversational_rows(make_preference_examples(8, seed=2))
    args = trl.DPOConfig(
        output_dir=output_dir,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        gradient_checkpointing=gradient_checkpointing == "reentrant",
        gradient_checkpointing_kwargs={"use_reentrant": True} if gradient_checkpointing == "reentrant" else None,
        # What users set for a frozen tower or text-only batches; with reentrant checkpointing it is the crash.
        ddp_find_unused_parameters=True if gradient_checkpointing == "reentrant" else None,
    )
    kwargs = dict(
        model=AutoModelForImageTextToText.from_pretrained(model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoProcessor.from_pretrained(model_dir),
    )
    if gradient_checkpointing == "reentrant":
        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    if mode == "stock-reentrant":
        trl.DPOTrainer(**kwargs).train()  # raises on both ranks
        return
    if mode == "unfreeze":
        unfreeze_projector_at_step_two(kwargs, output_dir)
        return
    trainer = VLMDPOTrainer(**kwargs, callbacks=[NanOnRankOne()])
    trainer.train()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    replicas = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(replicas, flat)
    result = {
        "skipped": [outcome.skipped for outcome in trainer.vlm_dpo_step_outcomes],
        "reasons": [list(outcome.reasons) for outcome in trainer.vlm_dpo_step_outcomes],
        "replicas_equal": all(torch.equal(replicas[0], other) for other in replicas[1:]),
        "finite": bool(torch.isfinite(flat).all()),
        "static_graph": trainer.args.ddp_static_graph,
        "find_unused": trainer.args.ddp_find_unused_parameters,
    }
    with open(os.path.join(output_dir, f"rank{dist.get_rank()}.json"), "w") as handle:
        json.dump(result, handle)
    dist.barrier()


def unfreeze_projector_at_step_two(kwargs: dict, output_dir: str) -> None:
    kwargs["args"].max_steps = 4
    snapshots = ProjectorAtStepBegin()
    config = {"freeze": {"unfreeze": [{"at_step": 2, "groups": ["projector"]}]}}
    trainer = VLMDPOTrainer(**kwargs, vlm_dpo_config=config, callbacks=[snapshots])
    trainer.train()
    steps = snapshots.snapshots
    final = torch.cat([p.detach().flatten() for p in trainer.model.model.multi_modal_projector.parameters()])
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    replicas = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(replicas, flat)
    groups = {group.get("group"): len(group["params"]) for group in trainer.optimizer.param_groups}
    result = {
        "projector_moved_before_stage": not (torch.equal(steps[0], steps[1]) and torch.equal(steps[1], steps[2])),
        "projector_moved_after_stage": not torch.equal(steps[2], final),
        "replicas_equal": all(torch.equal(replicas[0], other) for other in replicas[1:]),
        "projector_in_optimizer": groups.get("projector", 0),
        "skipped": [outcome.skipped for outcome in trainer.vlm_dpo_step_outcomes],
    }
    with open(os.path.join(output_dir, f"rank{dist.get_rank()}.json"), "w") as handle:
        json.dump(result, handle)
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
