"""``sharing.reference: precompute``: one pass of the frozen reference over the training set before step 0.

The pass reads the training set as the Trainer's own dataloaders do (its column removal, the collation hooks,
the framework's collator, accelerate's split over ranks), runs the reference alone on each batch through the
shared step (packed rows, each pair's images encoded once), and records each pair's log-probs by content
(``sharing/reference_cache.py``). Every rank ends with every entry; rank 0 writes the file. Under ZeRO-3 or FSDP
a forward is a collective, so each batch's forward runs on every rank when any rank needs it.

The file is named by a fingerprint of the reference as the pass sees it (its frozen weights, config, dtype and
attention; the framework and how log-probs are computed): another model is another file, and a pair whose
tokens or images changed is another key. What a run needs and finds there is not computed again (an epoch, a
resume, a second run sharing the folder).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
from typing import Any

import torch

from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.sharing.reference_cache import KEYS_KEY, REFERENCE_KEY, ReferenceAttach, ReferenceCache

logger = logging.getLogger("vlm_dpo_plugins.adapters")
DEFAULT_FOLDER = "vlm_dpo_reference"


def check_precompute(config: Any, *, framework: str, framework_computes_loss: bool, step: Any) -> bool:
    """Whether this run precomputes its reference (``sharing.reference: precompute`` that can apply), else why not."""
    sharing = config.section("sharing")
    if sharing is None or sharing.reference != "precompute":
        return False
    if framework_computes_loss:
        raise ConfigError(
            "sharing.reference: precompute feeds the plugins' loss, but this run leaves the loss to the framework's "
            f"own code ({framework}: a loss type or option only it has): use a loss the plugins compute, or "
            "sharing.reference: live"
        )
    if step.extra_rows:
        raise ConfigError(
            f"sharing.reference: precompute: loss.type {config.loss.type!r} reads reference log-probs of rows made "
            "during the step (the chosen response under a corrupted image), which a pass before training cannot "
            "score; set sharing.reference: live"
        )
    if not step.needs.reference:
        logger.info("vlm-dpo: sharing.reference: loss.type %r reads no reference: nothing to compute", config.loss.type)
        return False
    return True


def precompute_reference(trainer: Any, attach: ReferenceAttach) -> ReferenceCache:
    """The pass; afterwards ``attach`` adds each batch's cached reference to it."""
    if not hasattr(trainer.train_dataset, "__len__"):
        raise ConfigError(
            "sharing.reference: precompute reads the training set before step 0, but this one is streamed (an "
            "iterable dataset, which has no fixed set of rows to score): load it map-style, or set "
            "sharing.reference: live"
        )
    accelerator = trainer.accelerator
    model = trainer.model_wrapped
    reference_model, _ = trainer.vlm_dpo_reference_model(model)
    fingerprint = _same_on_every_rank(reference_fingerprint(accelerator.unwrap_model(reference_model), trainer))
    sharing = trainer.vlm_dpo_config.sharing
    folder = sharing.reference_cache or os.path.join(trainer.args.output_dir, DEFAULT_FOLDER)
    cache = ReferenceCache(folder, fingerprint)
    cache.load()
    attach.cache, attach.carry_keys = cache, True
    dataloader = trainer._get_dataloader(
        dataset=trainer.train_dataset,
        description="vlm-dpo reference pass",
        batch_size=trainer.args.per_device_train_batch_size,
        sampler_fn=trainer._get_eval_sampler,
    )
    computed: dict[str, Any] = {}
    seen: list[str] = []
    mode = model.training
    model.eval()  # the reference as a fixed function: no dropout
    try:
        from tqdm.auto import tqdm

        shown = trainer.is_local_process_zero() and not trainer.args.disable_tqdm
        for batch in tqdm(dataloader, desc="vlm-dpo: reference log-probs", disable=not shown):
            keys = batch.pop(KEYS_KEY)
            seen += keys
            needed = batch.pop(REFERENCE_KEY, None) is None
            if not _any_rank(accelerator, needs=needed):
                continue
            batch = trainer._prepare_inputs(batch)
            logps = trainer.vlm_dpo_step.reference_only(
                model, trainer.vlm_dpo_step_inputs(batch), trainer._step_reference
            )
            if needed:
                added = cache.add(keys, logps.logps, logps.token_counts)
                computed.update({key: cache.entries[key] for key in added})
    finally:
        model.train(mode)
        attach.carry_keys = False
        if dataloader in accelerator._dataloaders:
            accelerator._dataloaders.remove(dataloader)
    computed, seen = _gathered(computed, seen)
    cache.entries.update(computed)
    if trainer.args.process_index == 0:
        cache.save(seen)
    accelerator.wait_for_everyone()
    pairs = len(set(seen))
    logger.info(
        "vlm-dpo: sharing.reference: precompute: %d training pair(s): %d computed, %d read from %s",
        pairs,
        len(computed),
        pairs - len(computed),
        cache.path,
    )
    return cache


def reference_fingerprint(reference: torch.nn.Module, trainer: Any) -> str:
    """What the reference log-probs depend on: the reference's fixed weights, config, dtype and attention, the
    framework, and the settings that change how the step computes log-probs."""
    digest = hashlib.sha256()
    for name, tensor in _fixed_tensors(reference):
        data = tensor.detach()
        digest.update(f"{name}{data.dtype}{tuple(getattr(tensor, 'ds_shape', data.shape))}".encode())
        if data.numel():
            digest.update(data.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    config = getattr(reference, "config", None)
    context = trainer.vlm_dpo_context()
    facts = {
        "config": config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config),
        "framework": [context.framework, context.framework_version],
        "torch": torch.__version__,
        "sharing": dataclasses.asdict(trainer.vlm_dpo_config.sharing) | {"reference_cache": None},
        "loss": dataclasses.asdict(trainer.vlm_dpo_config.loss) if trainer.vlm_dpo_config.section("loss") else None,
    }
    digest.update(json.dumps(facts, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _fixed_tensors(model: torch.nn.Module):
    """Parameters and buffers of the reference pass: PEFT's adapter weights (off in that pass) left out."""
    adapter_names = set()
    for module_name, module in model.named_modules():
        for attribute in getattr(module, "adapter_layer_names", ()):  # PEFT tuner layers: lora_A, lora_B, ...
            adapter_names.add(f"{module_name}.{attribute}." if module_name else f"{attribute}.")
        if type(module).__name__ == "ModulesToSaveWrapper":  # the trained copy; original_module is the reference's
            adapter_names.add(f"{module_name}.modules_to_save.")
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if not any(name.startswith(prefix) for prefix in adapter_names):
            yield name, tensor


def release_reference(trainer: Any) -> bool:
    """The separate reference model dropped from memory (the steps read the cache); True when one was released."""
    reference = trainer.ref_model
    if reference is None:
        return False
    accelerator = trainer.accelerator
    accelerator._models = [model for model in accelerator._models if model is not reference]
    trainer.ref_model = None
    step = trainer.vlm_dpo_step
    step.feature_reuse = None
    if step.sharing is not None:
        step.sharing._reference_features = None
    del reference
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True


def _any_rank(accelerator: Any, *, needs: bool) -> bool:
    """Whether any rank needs this batch's forward (a sharded model's forward is a collective on every rank)."""
    if accelerator.num_processes == 1:
        return needs
    flag = torch.tensor([1.0 if needs else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _gathered(computed: dict[str, Any], seen: list[str]) -> tuple[dict[str, Any], list[str]]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return computed, seen
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, (computed, seen))
    merged: dict[str, Any] = {}
    keys: list[str] = []
    for part_computed, part_seen in parts:
        merged.update(part_computed)
        keys += part_seen
    return merged, keys


def _same_on_every_rank(value: str) -> str:
    # Under ZeRO-3 each rank holds other shards: rank 0's fingerprint names the file for all.
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
