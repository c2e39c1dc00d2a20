"""One rank of the FSDP2 mixed-batch runs: the tiny VLM under ``fully_shard``, rank 1's batch without an image.

accelerate runs FSDP only on accelerators (on CPU it builds DDP instead, silently), so TRL's and the other
frameworks' FSDP2 paths cannot run here; this is the part that can: torch's own ``fully_shard`` over gloo, each
vision layer, language layer and the projector a unit of its own, as accelerate's transformer auto-wrap makes
them. ``fsdp2_worker.py MODEL_DIR stock|lockstep|guards|unfreeze|unfreeze-unheld GROUPS`` (GROUPS: ``language`` or
``language,projector``, what trains; the unfreeze modes train the language model and unfreeze the projector at
step 1). Before sharding, every rank computes its own batch's loss and gradients on an unsharded copy and the ranks
average those gradients: what FSDP2 must give. Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_dpo_plugins.guards.vision_lockstep import VisionLockstep
from vlm_dpo_plugins.tiny.data import make_preference_examples

STEPS = 2
MAX_NORM = 0.5


def batch(processor, rank: int, step: int) -> dict:
    world_size = dist.get_world_size()
    example = make_preference_examples(world_size * STEPS, seed=5)[world_size * step + rank]
    content = [{"type": "text", "text": example.prompt}]
    images = None
    if rank == 0:  # only rank 0 ever has an image
        content.insert(0, {"type": "image"})
        images = [example.image]
    messages = [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": example.chosen}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    inputs["labels"] = inputs["input_ids"].clone()
    return dict(inputs)


def train_groups(model, trainable: list[str]) -> None:
    for name, parameter in model.named_parameters():
        group = "vision" if "vision" in name else "projector" if "projector" in name else "language"
        parameter.requires_grad_(group in trainable)


def shard(model, projector_unit: bool = True) -> None:
    inner = model.model
    for layer in inner.vision_tower.encoder.layers:
        fully_shard(layer)
    for layer in inner.language_model.layers:
        fully_shard(layer)
    if projector_unit:
        fully_shard(inner.multi_modal_projector)
    fully_shard(model)


def main() -> None:
    model_dir, mode, trainable = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="eager")
    train_groups(model, trainable)
    if mode == "guards":
        result = guarded_steps(model, processor, rank)
    elif mode.startswith("unfreeze"):
        result = unfreeze_steps(model, processor, rank, hold_later_stages=mode == "unfreeze")
    else:
        result = sharded_passes(model, processor, rank, mode)
    print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def unsharded_average(model, processor, rank: int, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """This rank's losses on an unsharded copy, and the gradients averaged over the ranks: what FSDP2 must give."""
    reference = copy.deepcopy(model)
    losses, gradients = [], {}
    for step in range(steps):
        loss = reference(**batch(processor, rank, step)).loss
        loss.backward()
        losses.append(loss.item())
    for name, parameter in reference.named_parameters():
        if parameter.requires_grad:
            # The text-only rank's projector saw no gradient: zero, as in the average FSDP2 takes.
            gradient = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
            dist.all_reduce(gradient)
            gradients[name] = gradient / dist.get_world_size()
    return losses, gradients


def sharded_passes(model, processor, rank: int, mode: str) -> dict:
    expected_losses, expected_grads = unsharded_average(model, processor, rank, STEPS)
    shard(model)
    lockstep = VisionLockstep([model]) if mode == "lockstep" else None
    losses = []
    for step in range(STEPS):
        loss = model(**batch(processor, rank, step)).loss
        loss.backward()
        losses.append(loss.item())
    worst = 0.0
    for name, parameter in model.named_parameters():
        if name in expected_grads:
            full = parameter.grad.full_tensor()
            worst = max(worst, float((full - expected_grads[name]).abs().max()))
    return {
        "rank": rank,
        "losses": losses,
        "expected_losses": expected_losses,
        "worst_grad_difference": worst,
        "compared_grads": len(expected_grads),
        "stand_in_encodes": None if lockstep is None else lockstep.stand_in_encodes,
    }


def guarded_steps(model, processor, rank: int) -> dict:
    """Two steps through the guards: step 0 clipped to ``MAX_NORM`` over all shards; step 1 has a NaN in the last
    rank's shard of one gradient only, and every rank must skip it with weights and optimizer state untouched."""
    from vlm_dpo_plugins.config_source import load_plugin_config
    from vlm_dpo_plugins.guards.clipping import measure_grad_norms, parameters_by_group
    from vlm_dpo_plugins.guards.step import StepGuard
    from vlm_dpo_plugins.manager import create_plugin_manager

    _, expected = unsharded_average(model, processor, rank, 1)
    expected_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in expected.values()])))
    shard(model)
    VisionLockstep([model])
    plugins = create_plugin_manager()
    config, _ = load_plugin_config(plugins, {"guards": {"max_grad_norm": MAX_NORM}})
    plugins.hook.vlm_dpo_configure(config=config)
    guard = StepGuard(plugins)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def trainable() -> dict:
        return parameters_by_group(model.named_parameters(), {})

    model(**batch(processor, rank, 0)).loss.backward()
    first = guard.step(optimizer, trainable(), 0.7, 0)
    clipped = measure_grad_norms(trainable())

    loss = model(**batch(processor, rank, 1)).loss
    loss.backward()
    if rank == dist.get_world_size() - 1:
        poisoned = next(p for p in model.parameters() if p.requires_grad)
        poisoned.grad.to_local().view(-1)[0] = math.nan
    before = {name: p.to_local().detach().clone() for name, p in model.named_parameters()}
    state_before = [
        {key: value.to_local().clone() if hasattr(value, "to_local") else value.clone() for key, value in s.items()}
        for s in optimizer.state.values()
    ]
    second = guard.step(optimizer, trainable(), loss.detach(), 1)
    unchanged = all(torch.equal(before[name], p.to_local()) for name, p in model.named_parameters())
    state_unchanged = all(
        torch.equal(value.to_local() if hasattr(value, "to_local") else value, old[key])
        for old, new in zip(state_before, optimizer.state.values())
        for key, value in new.items()
    )
    return {
        "rank": rank,
        "first_norm": first.grad_norms.total,
        "expected_first_norm": expected_norm,
        "first_skipped": first.skipped,
        "clipped_norm": clipped.total,
        "second_skipped": second.skipped,
        "second_reasons": list(second.reasons),
        "weights_unchanged": unchanged,
        "optimizer_state_unchanged": state_unchanged,
    }


UNFREEZE_STAGE = 1
UNFREEZE_STEPS = 3


def unfreeze_steps(model, processor, rank: int, *, hold_later_stages: bool) -> dict:
    """The projector unfrozen at step 1 with the shared step's own pieces (``TrainableState``, the freeze plugin's
    optimizer groups, ``unfreeze_into_optimizer``), on the sharded model; against one process stepping the same
    model on the ranks' averaged gradients. ``hold_later_stages`` as the shared step sets it for FSDP2: the
    projector requires a gradient from the start and its gradient is dropped until its stage. Without it the
    projector's ``requires_grad`` is first set at its stage, after ``fully_shard`` (as on one process)."""
    from vlm_dpo_plugins.adapters.hf_trainer.trainable import TrainableState
    from vlm_dpo_plugins.config_source import load_plugin_config
    from vlm_dpo_plugins.freeze.optimizer import optimizer_param_groups, unfreeze_into_optimizer
    from vlm_dpo_plugins.manager import create_plugin_manager

    plugins = create_plugin_manager()
    stage = {"at_step": UNFREEZE_STAGE, "groups": ["projector"]}
    config, _ = load_plugin_config(plugins, {"freeze": {"trainable": ["language"], "unfreeze": [stage]}})
    plugins.hook.vlm_dpo_configure(config=config)

    def build(model, hold: bool):
        trainable = TrainableState(plugins, model, limits_every_parameter=False, hold_later_stages=hold)
        trainable.apply(0)
        return trainable

    def optimizer_for(model, trainable):
        names = {name for name, p in model.named_parameters() if trainable.is_trained(name, p)}
        entries = plugins.hook.vlm_dpo_optimizer_groups(
            groups=trainable.groups, trainable=names, base_learning_rate=1e-2
        )
        rates = {entry["group"]: entry["lr"] for entry in entries}
        # Weight decay on: a held parameter stepped with a zero gradient would still move.
        return torch.optim.AdamW(optimizer_param_groups(model, entries, weight_decay=0.1)), rates

    def step_begin(model, trainable, optimizer, rates, step):
        newly = trainable.apply(step)
        if newly:
            unfreeze_into_optimizer(model, optimizer, newly, trainable.groups, rates)

    reference = copy.deepcopy(model)
    reference_trainable = build(reference, hold=False)
    reference_optimizer, reference_rates = optimizer_for(reference, reference_trainable)
    sharded_trainable = build(model, hold=hold_later_stages)
    # The projector in the root unit, with the embeddings that train from step 0: a unit of mixed requires_grad.
    shard(model, projector_unit=False)
    VisionLockstep([model])
    optimizer, rates = optimizer_for(model, sharded_trainable)

    projector = list(sharded_trainable.groups["projector"])
    initial = {name: p.full_tensor().clone() for name, p in model.named_parameters() if name in projector}
    projector_moved, worst = [], 0.0
    for step in range(UNFREEZE_STEPS):
        step_begin(reference, reference_trainable, reference_optimizer, reference_rates, step)
        reference(**batch(processor, rank, step % STEPS)).loss.backward()
        for parameter in reference.parameters():
            if parameter.requires_grad:
                gradient = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
                dist.all_reduce(gradient)
                parameter.grad = gradient / dist.get_world_size()
        reference_optimizer.step()
        reference_optimizer.zero_grad(set_to_none=True)

        step_begin(model, sharded_trainable, optimizer, rates, step)
        model(**batch(processor, rank, step % STEPS)).loss.backward()
        sharded_trainable.drop_held_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        full = {name: p.full_tensor() for name, p in model.named_parameters()}
        projector_moved.append(any(not torch.equal(full[name], initial[name]) for name in projector))
        expected = dict(reference.named_parameters())
        worst = max(worst, max(float((full[name] - expected[name]).abs().max()) for name in full))
    return {"rank": rank, "projector_moved": projector_moved, "worst_weight_difference": worst}


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
