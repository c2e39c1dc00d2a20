"""The lint rules: each known cause of a failed VLM DPO run, judged on a ``TrainingSetup``.

Every rule returns findings with the setting to change, written in the framework's own
key names, so the fix can be pasted into the config that was checked.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

from vlm_dpo_plugins.doctor.setup import TrainingSetup
from vlm_dpo_plugins.guards.deepspeed_buckets import bucket_memory_ceiling, deepspeed_bucket_sizes
from vlm_dpo_plugins.shown import clipped, shown
from vlm_dpo_plugins.types import Finding, Severity

VISION_MODULE = re.compile(
    r"(visual|vision_tower|vision_model|vision_encoder|image_encoder|patch_embed|merger"
    r"|multi_modal_projector|mm_projector|aligner)"
)
CONV_MODULE = re.compile(r"(patch_embed|patch_embedding|conv)")
LORA_SCALING_RANGE = (0.5, 4.0)
LORA_MIN_LR = 1e-5
FULL_MAX_LR = 2e-5
# LLaMA-Factory 0.9.5 passes pref_loss to its own DPO loss without loss_type: with trl >= 0.20 these compute sigmoid.
LLAMAFACTORY_SILENT_LOSSES = ("hinge", "ipo")
LLAMAFACTORY_LOSSES = ("sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo")

KEYS = {
    "llamafactory": {
        "beta": "pref_beta",
        "vision": "freeze_vision_tower: true",
        "projector": "freeze_multi_modal_projector: true",
        "alpha": "lora_alpha",
        "rank": "lora_rank",
        "targets": "lora_target",
        "reentrant": "use_reentrant_gc: false",
        "reentrant_field": "use_reentrant_gc",
        "clip": "max_grad_norm: 1.0",
    },
    "swift": {
        "beta": "--beta",
        "vision": "--freeze_vit true",
        "projector": "--freeze_aligner true",
        "alpha": "--lora_alpha",
        "rank": "--lora_rank",
        "targets": "--target_modules",
        "reentrant": "--gradient_checkpointing_kwargs '{\"use_reentrant\": false}'",
        "reentrant_field": "--gradient_checkpointing_kwargs",
        "clip": "--max_grad_norm 1",
    },
    "trl": {
        "beta": "beta",
        "vision": "VLMDPOTrainer (freezes them by default) or requires_grad_(False) on them",
        "projector": "VLMDPOTrainer (freezes it by default)",
        "alpha": "lora_alpha",
        "rank": "lora_r",
        "targets": "lora_target_modules",
        "reentrant": "gradient_checkpointing_kwargs: {use_reentrant: false}",
        "reentrant_field": "gradient_checkpointing_kwargs",
        "clip": "max_grad_norm: 1.0",
    },
}


def lint(setup: TrainingSetup, hidden_size: int | None = None) -> list[Finding]:
    findings: list[Finding] = list(setup.problems)
    for rule in RULES:
        findings += rule(setup, hidden_size)
    return findings


def _finding(setup: TrainingSetup, code: str, severity: Severity, message: str, fix: str, key: str) -> Finding:
    return Finding(code, severity, message, fix, field=key, source=f"doctor:{setup.framework}")


def beta_rule(setup: TrainingSetup, _: int | None) -> list[Finding]:
    if setup.beta is None or setup.beta > 0:
        return []
    key = KEYS[setup.framework]["beta"]
    return [
        _finding(
            setup,
            "beta-zero",
            Severity.ERROR,
            f"beta is {setup.beta}: every DPO reward beta*(log-ratio) is 0, the loss stays at ln 2",
            f"set {key} to 0.1 (0.05..0.5 is usual)",
            key,
        )
    ]


def vision_rule(setup: TrainingSetup, _: int | None) -> list[Finding]:
    parts = [
        name
        for name, trainable in (("vision tower", setup.vision_trainable), ("projector", setup.projector_trainable))
        if trainable
    ]
    if not parts or not setup.dpo:
        return []
    keys = KEYS[setup.framework]
    fixes = [keys["vision"]] * (setup.vision_trainable is True) + [keys["projector"]] * bool(setup.projector_trainable)
    return [
        _finding(
            setup,
            "vision-trainable",
            Severity.WARNING,
            f"the {' and '.join(parts)} will be trained in DPO: the known cause of a rising loss with reward accuracy "
            "~0.5 and chosen/rejected rewards moving together (each update shifts the image features both responses "
            "see)",
            f"{'; '.join(dict.fromkeys(fixes))}; train the language model (unfreeze later, at a lower rate, if wanted)",
            "freeze",
        )
    ]


def lora_scaling_rule(setup: TrainingSetup, _: int | None) -> list[Finding]:
    if not setup.lora or not setup.lora_r or setup.lora_alpha is None:
        return []
    scaling = setup.lora_alpha / (math.sqrt(setup.lora_r) if setup.rslora else setup.lora_r)
    low, high = LORA_SCALING_RANGE
    if low <= scaling <= high:
        return []
    keys = KEYS[setup.framework]
    effect = "too small to change the outputs (LoRA 'does nothing')" if scaling < low else "large enough to destabilise"
    return [
        _finding(
            setup,
            "lora-scaling",
            Severity.WARNING,
            f"LoRA {keys['alpha']}={setup.shown('lora_alpha', setup.lora_alpha)} with "
            f"{keys['rank']}={setup.shown('lora_rank', setup.lora_r)} scales the update by {scaling:.3g}: {effect}",
            f"set {keys['alpha']} to {keys['rank']} or 2x it (scaling 1-2)",
            keys["alpha"],
        )
    ]


def lora_targets_rule(setup: TrainingSetup, _: int | None) -> list[Finding]:
    if not setup.lora:
        return []
    keys = KEYS[setup.framework]
    conv = [target for target in setup.lora_targets if CONV_MODULE.search(target)]
    vision = [target for target in setup.lora_targets if VISION_MODULE.search(target) and target not in conv]
    findings = []
    if conv:
        findings.append(
            _finding(
                setup,
                "lora-targets-conv",
                Severity.ERROR,
                f"LoRA targets {conv}: the patch embedding is a convolution (Conv3d in Qwen2-VL) that LoRA cannot wrap "
                "or that PEFT wraps without the vision tower's other layers",
                f"remove them from {keys['targets']}; target the language model's linear layers",
                keys["targets"],
            )
        )
    if vision and setup.dpo:
        findings.append(
            _finding(
                setup,
                "lora-targets-vision",
                Severity.WARNING,
                f"LoRA targets vision modules {vision}: the vision side then trains in DPO (the rising-loss, accuracy "
                "~0.5 failure)",
                f"target only language-model modules in {keys['targets']}",
                keys["targets"],
            )
        )
    return findings


def learning_rate_rule(setup: TrainingSetup, _: int | None) -> list[Finding]:
    rate = setup.learning_rate
    if rate is None or not setup.dpo:
        return []
    shown = setup.shown("learning_rate", f"{rate:g}")
    if setup.lora and rate < LORA_MIN_LR:
        return [
            _finding(
                setup,
                "learning-rate",
                Severity.WARNING,
                f"learning rate {shown} with LoRA: a full-fine-tuning DPO rate; the adapter barely moves",
                "use ~5e-5..2e-4 for LoRA DPO",
                "learning_rate",
            )
        ]
    if not setup.lora and rate > FULL_MAX_LR:
        return [
            _finding(
                setup,
                "learning-rate",
                Severity.WARNING,
                f"learning rate {shown} for full DPO: far above the usual 5e-7..5e-6; the loss rises",
                "use ~5e-7..5e-6 for full DPO (or LoRA with ~1e-4)",
                "learning_rate",
            )
        ]
    return []


def reentrant_rule(setup: TrainingSetup, _: int | None) -> list[Finding]:
    if not (setup.gradient_checkpointing and setup.reentrant and setup.lora):
        return []
    key = KEYS[setup.framework]["reentrant"]
    field_name = KEYS[setup.framework]["reentrant_field"]
    return [
        _finding(
            setup,
            "reentrant-checkpointing",
            Severity.WARNING,
            f"reentrant gradient checkpointing{' (the default)' if 'use_reentrant_gc' in setup.defaulted else ''} with "
            "LoRA: on several GPUs (DDP) this fails with 'Expected to mark a variable ready only once' (DPO runs two "
            "forwards before one backward)",
            f"{key}; the vlm-dpo adapters switch to non-reentrant checkpointing (guards.non_reentrant_checkpointing)",
            field_name,
        )
    ]


def clipping_rule(setup: TrainingSetup, _: int | None) -> list[Finding]:
    if not setup.bf16 or (setup.max_grad_norm is not None and setup.max_grad_norm > 0):
        return []
    key = KEYS[setup.framework]["clip"]
    return [
        _finding(
            setup,
            "bf16-no-clipping",
            Severity.WARNING,
            f"bf16 without gradient clipping (max_grad_norm {setup.max_grad_norm}): one overflowing "
            "gradient reaches the weights as NaN (the Qwen2-VL second-stage NaN)",
            f"{key}; keep the vlm-dpo guards' non-finite skip on",
            "max_grad_norm",
        )
    ]


def deepspeed_rule(setup: TrainingSetup, hidden_size: int | None) -> list[Finding]:
    if setup.deepspeed_source and setup.deepspeed is None:
        if setup.deepspeed_source in ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"):
            return []  # ms-swift's built-in configs use "auto" buckets, which the vlm-dpo adapters size
        return [
            _finding(
                setup,
                "deepspeed-config",
                Severity.WARNING,
                f"the DeepSpeed config {setup.deepspeed_source!r} was not found next to the config",
                "give a path that exists (relative paths start from the config's folder)",
                "deepspeed",
            )
        ]
    zero = (setup.deepspeed or {}).get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if not isinstance(stage, int) or stage not in (1, 2, 3):
        return []
    bf16 = setup.deepspeed.get("bf16")
    dtype = "bf16" if setup.bf16 or (isinstance(bf16, dict) and bf16.get("enabled") in (True, "auto")) else "fp32"
    ceiling = bucket_memory_ceiling(dtype)
    wanted = deepspeed_bucket_sizes(10**12, hidden_size, stage, dtype=dtype) if hidden_size else {}
    findings = []
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        value = zero.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        limit = wanted.get(key, ceiling)
        if value > 1.5 * limit:
            advice = f"{key}: {wanted[key]:.3g}" if key in wanted else f"{key} <= {ceiling:.3g}"
            findings.append(
                _finding(
                    setup,
                    "deepspeed-buckets",
                    Severity.WARNING,
                    f"ZeRO-{stage} {key} = {value:.3g} elements: above what the model needs"
                    + (f" (hidden size {hidden_size})" if hidden_size else "")
                    + f" and the {dtype} memory budget; oversized buckets are a known factor in bf16 ZeRO-2 NaN/OOM",
                    f"{advice}, or 'auto' with the vlm-dpo adapters (guards.tune_deepspeed_buckets sizes them)",
                    f"zero_optimization.{key}",
                )
            )
    return findings


def loss_rule(setup: TrainingSetup, _: int | None) -> list[Finding]:
    if setup.framework != "llamafactory" or setup.loss is None:
        return []
    if setup.loss in LLAMAFACTORY_SILENT_LOSSES:
        return [
            _finding(
                setup,
                "pref-loss-ignored",
                Severity.WARNING,
                f"pref_loss: {clipped(setup.loss, 80)} is silently computed as sigmoid DPO by LLaMA-Factory 0.9.5 with "
                "trl >= 0.20 (its loss call passes no loss_type)",
                f"with the vlm-dpo adapter set vlm_dpo: {{loss: {{type: {setup.loss}}}}}, which computes it",
                "pref_loss",
            )
        ]
    if setup.loss not in LLAMAFACTORY_LOSSES or setup.loss == "kto_pair":
        return [
            _finding(
                setup,
                "pref-loss-ignored",
                Severity.ERROR,
                f"pref_loss: {clipped(setup.loss, 80)} does not run in LLaMA-Factory 0.9.5 DPO",
                f"use one of {', '.join(x for x in LLAMAFACTORY_LOSSES if x != 'kto_pair')}",
                "pref_loss",
            )
        ]
    return []


def adapter_rule(setup: TrainingSetup, _: int | None) -> list[Finding]:
    """A LoRA adapter folder given where a full model is read, or an adapter the framework will not apply."""
    findings = []
    model_key = {"llamafactory": "model_name_or_path", "swift": "--model", "trl": "model_name_or_path"}[setup.framework]
    folder = Path(setup.model) if setup.model else None
    if folder is not None and _is_file(folder / "adapter_config.json") and not _is_file(folder / "config.json"):
        base = _json_object(folder / "adapter_config.json").get("base_model_name_or_path")
        where = {"llamafactory": "adapter_name_or_path", "swift": "--adapters", "trl": "a PeftModel on the base model"}
        findings.append(
            _finding(
                setup,
                "adapter-not-applied",
                Severity.ERROR,
                f"{model_key} {folder} is a LoRA adapter (adapter_config.json, no config.json), not a model",
                f"set {model_key} to the base model ({base or 'see adapter_config.json'}) and load the adapter with "
                f"{where[setup.framework]}, or merge it first (llamafactory-cli export, swift export --merge_lora)",
                model_key,
            )
        )
    adapters = setup.raw.get("adapter_name_or_path")
    if setup.framework == "llamafactory" and adapters and not setup.lora:
        findings.append(
            _finding(
                setup,
                "adapter-not-applied",
                Severity.WARNING,
                f"adapter_name_or_path is set but finetuning_type is not lora: LLaMA-Factory will not apply "
                f"{shown(adapters)}",
                "set finetuning_type: lora to load (or keep training) the adapter",
                "adapter_name_or_path",
            )
        )
    return findings


RULES: tuple[Callable[[TrainingSetup, int | None], list[Finding]], ...] = (
    beta_rule,
    vision_rule,
    lora_scaling_rule,
    lora_targets_rule,
    learning_rate_rule,
    reentrant_rule,
    clipping_rule,
    deepspeed_rule,
    loss_rule,
    adapter_rule,
)


def hidden_size_of(model: str | None) -> int | None:
    """The widest hidden size in a local model's config.json (hub ids are not fetched)."""
    if not model:
        return None
    config = Path(model) / "config.json"
    if not _is_file(config):
        return None
    data = _json_object(config)  # an unreadable config.json: the width is unknown, the run's own load names it
    widths = [
        section.get("hidden_size")
        for section in (data, data.get("text_config") or {}, data.get("vision_config") or {})
        if isinstance(section, dict)
    ]
    return max((width for width in widths if isinstance(width, int)), default=None)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the filesystem: no such file here
        return False


def _json_object(path: Path) -> dict:
    """The JSON object in a model folder's file; ``{}`` when it cannot be read as one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}
