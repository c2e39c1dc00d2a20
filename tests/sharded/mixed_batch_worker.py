"""One rank of the mixed-batch runs of TRL: even ranks draw pairs with an image, odd ranks text-only pairs.

Run as a plain script, one process per rank (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment):
``mixed_batch_worker.py MODEL_DIR OUTPUT_DIR stock|plugins ENGINE GROUPS``, ENGINE one of zero2, zero3, ddp, fsdp2
(GROUPS: the freeze groups that train, comma-separated; ``language+projector@1`` also unfreezes the projector at
step 1). Prints one ``RESULT {json}`` line: the logged losses, how often this rank encoded a stand-in image, a
checksum of every weight after training (gathered from the shards under ZeRO-3 and FSDP2) and, with a stage
(LLaVA), of the projector's at each step's beginning and after training.

Environment: ``VLM_DPO_TEST_FSDP_ON_CPU=1`` opens accelerate's FSDP gate (tests/support/fsdp_on_cpu.py), so fsdp2
is accelerate's real FSDP2 (without it a CPU run gets DDP); ``VLM_DPO_TEST_NAN_RANK`` puts a NaN in that rank's
gradient at step 1; ``VLM_DPO_TEST_STEPS``, ``VLM_DPO_TEST_SAVE_STEPS`` and ``VLM_DPO_TEST_RESUME_FROM`` (a
checkpoint) set the run's length, its checkpoints and where it resumes; ``VLM_DPO_TEST_LORA=1`` trains LoRA
adapters on the language model's q/v projections.
"""

from __future__ import annotations

import json
import math
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
if os.environ.get("VLM_DPO_TEST_FSDP_ON_CPU") == "1":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "support"))
    from fsdp_on_cpu import open_gate

    open_gate()

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback  # noqa: E402
from vlm_dpo_plugins.adapters.trl import VLMDPOTrainer  # noqa: E402

from vlm_dpo_plugins.tiny import make_preference_examples, trl_conversational_rows  # noqa: E402

STEPS = 2
ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 10**9,
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3},
}

FSDP2 = {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True}}

NAN_RANK = int(os.environ["VLM_DPO_TEST_NAN_RANK"]) if "VLM_DPO_TEST_NAN_RANK" in os.environ else None
"""The rank whose gradient turns NaN at optimizer step 1 (an extra step is trained after it)."""


def zero_config(engine: str) -> dict | None:
    if not engine.startswith("zero"):
        return None
    return {**ZERO3, "zero_optimization": {"stage": int(engine.removeprefix("zero"))}}


class NanAtStepOne(TrainerCallback):
    """A NaN into one language weight's gradient on ``NAN_RANK`` during step 1's backward, before DeepSpeed's own
    hooks copy it into its partitions; under FSDP2 (whose backward runs on unsharded copies of the parameters)
    into this rank's shard of the reduced gradient, before the optimizer step."""

    def __init__(self) -> None:
        self.handle = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1 and int(os.environ["RANK"]) == NAN_RANK and args.fsdp:
            local = next(
                p.grad.to_local() for name, p in model.named_parameters()
                if "language_model" in name and p.grad is not None and p.grad.to_local().numel()
            )
            local.view(-1)[0] = math.nan

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1 and int(os.environ["RANK"]) == NAN_RANK and not args.fsdp:
            weight = next(p for name, p in model.named_parameters() if "language_model" in name and p.requires_grad)
            self.handle = weight.register_hook(lambda grad: torch.full_like(grad, math.nan))

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def checksum(parameters: list, engine: str) -> float:
    if engine == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(parameters):
            return sum(float(p.detach().double().sum()) for p in parameters)
    # FSDP2's parameters are DTensors: the sum of the whole tensor, not of this rank's shard.
    return sum(float(getattr(p, "full_tensor", p.detach)().detach().double().sum()) for p in parameters)


def projector_checksum(model, engine: str) -> float:
    return checksum(list(model.model.multi_modal_projector.parameters()), engine)


class ProjectorAtStepBegin(TrainerCallback):
    def __init__(self, engine: str) -> None:
        self.engine, self.checksums = engine, []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.checksums.append(projector_checksum(model, self.engine))


def mixed_rows() -> list[dict]:
    """Even rows with an image, odd rows text-only: read in order one row per rank, odd ranks never see an image
    (every row keeps its image with ``VLM_DPO_TEST_ALL_IMAGES=1``)."""
    rows = trl_conversational_rows(make_preference_examples(24, seed=3))
    if os.environ.get("VLM_DPO_TEST_ALL_IMAGES") == "1":
        return rows
    for row in rows[1::2]:
        row["images"] = []
        row["prompt"] = [{"role": "user", "content": [{"type": "text", "text": "Name a shape."}]}]
    return rows


def main() -> None:
    model_dir, output_dir, mode, engine, groups = sys.argv[1:6]
    trainable, _, stage = groups.partition("+")
    if engine.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    # Loaded before the DeepSpeed config exists, as a user's script loading the model first does.
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    args = trl.DPOConfig(
        output_dir=output_dir,
        max_steps=int(os.environ.get("VLM_DPO_TEST_STEPS") or (STEPS + 1 if NAN_RANK is not None else STEPS)),
        per_device_train_batch_size=int(os.environ.get("VLM_DPO_TEST_BATCH") or 1),
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="steps" if os.environ.get("VLM_DPO_TEST_SAVE_STEPS") else "no",
        save_steps=int(os.environ.get("VLM_DPO_TEST_SAVE_STEPS") or 500),
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        bf16=False,
        train_sampling_strategy="sequential",
        deepspeed=zero_config(engine),
        **(FSDP2 if engine == "fsdp2" else {}),
    )
    freeze = {"trainable": trainable.split(",")}
    if stage:
        stage_groups, _, at_step = stage.partition("@")
        freeze["unfreeze"] = [{"at_step": int(at_step), "groups": stage_groups.split(",")}]
    plugins = {} if mode == "stock" else {"vlm_dpo_config": {"freeze": freeze}}
    watch = ProjectorAtStepBegin(engine) if stage else None  # the stage's tests run LLaVA
    trainer_class = trl.DPOTrainer if mode == "stock" else VLMDPOTrainer
    if os.environ.get("VLM_DPO_TEST_LORA") == "1":
        from peft import LoraConfig

        plugins["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = trainer_class(
        **plugins,
        model=model,
        args=args,
        train_dataset=Dataset.from_list(mixed_rows()),
        processing_class=AutoProcessor.from_pretrained(model_dir),
        callbacks=[callback for callback in (watch, NanAtStepOne() if NAN_RANK is not None else None) if callback],
    )
    trainer.train(resume_from_checkpoint=os.environ.get("VLM_DPO_TEST_RESUME_FROM") or None)
    lockstep = getattr(trainer, "_vision_lockstep", None)
    inner = trainer.model.model
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "rank": int(os.environ["RANK"]),
        "losses": [entry["loss"] for entry in steps],
        "grad_norms": [entry.get("grad_norm") for entry in steps],
        "chosen_logps": [entry.get("logps/chosen") for entry in steps],
        "stand_in_encodes": None if lockstep is None else lockstep.stand_in_encodes,
        "checksum": checksum(list(trainer.model.parameters()), engine),
        "part_checksums": {  # LLaVA's parts
            "vision": checksum(list(inner.vision_tower.parameters()), engine),
            "projector": checksum(list(inner.multi_modal_projector.parameters()), engine),
            "language": checksum(list(inner.language_model.parameters()), engine),
            "head": checksum(list(trainer.model.get_output_embeddings().parameters()), engine),
        } if hasattr(inner, "vision_tower") else None,
        "parameter_type": type(next(trainer.model.parameters())).__name__,
        "projector_checksums": [*watch.checksums, projector_checksum(trainer.model, engine)] if watch else None,
        "wrapped_as": type(trainer.model_wrapped).__name__,
        "fsdp_enabled": trainer.is_fsdp_enabled,
        "skipped": [outcome.skipped for outcome in getattr(trainer, "vlm_dpo_step_outcomes", [])],
        "deepspeed_skipped": getattr(trainer.model_wrapped, "skipped_steps", None),
    }
    print("RESULT " + json.dumps(result), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
