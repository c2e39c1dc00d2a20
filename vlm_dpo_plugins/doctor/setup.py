"""A training config of any of the three frameworks, read into the facts the lint rules judge.

Each reader applies its framework's own defaults (LLaMA-Factory 0.9.5, ms-swift 4.6, TRL
1.16 with its CLI's ``ModelConfig``), so a setting left out is judged by the value the
framework will really use, and says so (``defaulted``).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm_dpo_plugins.errors import ConfigError

FRAMEWORKS = ("llamafactory", "swift", "trl")
LLAMAFACTORY_KEYS = {"stage", "finetuning_type", "pref_beta", "pref_loss", "cutoff_len", "lora_target", "template"}
SWIFT_KEYS = {"rlhf_type", "train_type", "freeze_vit", "freeze_aligner", "target_modules"}


@dataclass
class TrainingSetup:
    framework: str
    source: Path
    raw: dict[str, Any]
    dpo: bool = True
    lora: bool = False
    lora_r: int | None = None
    lora_alpha: float | None = None
    rslora: bool = False
    lora_targets: list[str] = field(default_factory=list)
    learning_rate: float | None = None
    vision_trainable: bool | None = None
    projector_trainable: bool | None = None
    gradient_checkpointing: bool = False
    reentrant: bool | None = None
    bf16: bool = False
    max_grad_norm: float | None = None
    deepspeed: dict[str, Any] | None = None
    deepspeed_source: str | None = None
    loss: str | None = None
    beta: float | None = None
    model: str | None = None
    defaulted: set[str] = field(default_factory=set)

    def shown(self, name: str, value: Any) -> str:
        return f"{value} (the default)" if name in self.defaulted else str(value)


def read_setup(path: Path, framework: str | None = None) -> TrainingSetup:
    raw = _load(path)
    framework = framework or _detect(raw, path)
    reader = {"llamafactory": _llamafactory, "swift": _swift, "trl": _trl}[framework]
    setup = TrainingSetup(framework=framework, source=path, raw=raw)
    reader(setup, _Values(raw, setup.defaulted))
    return setup


class _Values:
    """Reads keys with the framework's defaults, remembering which values were defaulted."""

    def __init__(self, raw: dict[str, Any], defaulted: set[str]) -> None:
        self.raw, self.defaulted = raw, defaulted

    def get(self, key: str, default: Any = None, name: str | None = None) -> Any:
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key]
        self.defaulted.add(name or key)
        return default


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path.absolute()}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        value = json.loads(text)
        return _from_arguments(value) if isinstance(value, list) else _plain(value, path)
    if path.suffix in (".yaml", ".yml"):
        return _plain(yaml.safe_load(text) or {}, path)
    return _from_arguments(shlex.split(text.replace("\\\n", " "), comments=True))


def _plain(value: Any, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"config file {path} holds a {type(value).__name__}; expected a mapping of settings")
    return value


def _from_arguments(arguments: list[Any]) -> dict[str, Any]:
    """``--key value`` / ``--flag`` lists (ms-swift's command line); leading command words are skipped."""
    values: dict[str, Any] = {}
    tokens = [str(token) for token in arguments]
    index = next((i for i, token in enumerate(tokens) if token.startswith("--")), len(tokens))
    while index < len(tokens):
        key = tokens[index].lstrip("-")
        following = []
        index += 1
        while index < len(tokens) and not tokens[index].startswith("--"):
            following.append(tokens[index])
            index += 1
        values[key] = yaml.safe_load(following[0]) if len(following) == 1 else following or True
    return values


def _detect(raw: dict[str, Any], path: Path) -> str:
    if raw.keys() & SWIFT_KEYS:
        return "swift"
    if raw.keys() & LLAMAFACTORY_KEYS:
        return "llamafactory"
    return "trl"


def _targets(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(part) for part in value]


def _deepspeed(setup: TrainingSetup, value: Any) -> None:
    if not value:
        return
    setup.deepspeed_source = str(value)
    if isinstance(value, dict):
        setup.deepspeed = value
        return
    candidate = Path(value)
    if not candidate.is_absolute():
        candidate = setup.source.parent / candidate
    if candidate.is_file():
        setup.deepspeed = json.loads(candidate.read_text(encoding="utf-8"))


def _llamafactory(setup: TrainingSetup, values: _Values) -> None:
    setup.dpo = values.get("stage", "sft") == "dpo"
    finetuning = values.get("finetuning_type", "lora")
    setup.lora = finetuning == "lora"
    setup.lora_r = values.get("lora_rank", 8)
    setup.lora_alpha = values.get("lora_alpha", None) or setup.lora_r * 2
    setup.rslora = bool(values.get("use_rslora", False))
    setup.lora_targets = _targets(values.get("lora_target", "all"))
    setup.learning_rate = _float(values.get("learning_rate", 5e-5))
    if finetuning == "full" or (setup.lora and setup.lora_targets == ["all"]):
        # LoRA "all" targets the vision tower only when LLaMA-Factory is told not to freeze it.
        setup.vision_trainable = not values.get("freeze_vision_tower", True)
        setup.projector_trainable = not values.get("freeze_multi_modal_projector", True)
    setup.gradient_checkpointing = not values.get("disable_gradient_checkpointing", False)
    setup.reentrant = bool(values.get("use_reentrant_gc", True))
    setup.bf16 = bool(values.get("bf16", False))
    setup.max_grad_norm = _float(values.get("max_grad_norm", 1.0))
    _deepspeed(setup, values.get("deepspeed"))
    setup.loss = values.get("pref_loss", "sigmoid")
    setup.beta = _float(values.get("pref_beta", 0.1))
    setup.model = values.get("model_name_or_path")


def _swift(setup: TrainingSetup, values: _Values) -> None:
    setup.dpo = values.get("rlhf_type", None) == "dpo"
    train_type = values.get("train_type", "lora")
    setup.lora = train_type == "lora"
    setup.lora_r = values.get("lora_rank", 8)
    setup.lora_alpha = values.get("lora_alpha", 32)
    setup.rslora = bool(values.get("use_rslora", False))
    setup.lora_targets = _targets(values.get("target_modules", "all-linear"))
    setup.learning_rate = _float(values.get("learning_rate", 1e-4 if setup.lora else 1e-5))
    setup.vision_trainable = not _bool(values.get("freeze_vit", True))
    setup.projector_trainable = not _bool(values.get("freeze_aligner", True))
    setup.gradient_checkpointing = _bool(values.get("gradient_checkpointing", True))
    setup.reentrant = _reentrant(values.get("gradient_checkpointing_kwargs", None))
    setup.bf16 = _bool(values.get("bf16", False)) or values.get("torch_dtype", None) == "bfloat16"
    setup.max_grad_norm = _float(values.get("max_grad_norm", 1.0))
    _deepspeed(setup, values.get("deepspeed"))
    setup.loss = values.get("loss_type", "sigmoid")
    setup.beta = _float(values.get("beta", 0.1))
    setup.model = values.get("model")


def _trl(setup: TrainingSetup, values: _Values) -> None:
    setup.lora = _bool(values.get("use_peft", False))
    setup.lora_r = values.get("lora_r", 16)
    setup.lora_alpha = values.get("lora_alpha", 32)
    setup.rslora = _bool(values.get("use_rslora", False))
    setup.lora_targets = _targets(values.get("lora_target_modules", None))
    setup.learning_rate = _float(values.get("learning_rate", 1e-6))
    if not setup.lora:
        # Stock trl.DPOTrainer trains every parameter of the model it is given.
        setup.vision_trainable = setup.projector_trainable = True
    setup.gradient_checkpointing = _bool(values.get("gradient_checkpointing", False))
    setup.reentrant = _reentrant(values.get("gradient_checkpointing_kwargs", None))
    setup.bf16 = _bool(values.get("bf16", False))
    setup.max_grad_norm = _float(values.get("max_grad_norm", 1.0))
    _deepspeed(setup, values.get("deepspeed"))
    setup.loss = values.get("loss_type", "sigmoid")
    setup.beta = _float(values.get("beta", 0.1))
    setup.model = values.get("model_name_or_path")


def _reentrant(kwargs: Any) -> bool | None:
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs)
    if isinstance(kwargs, dict) and "use_reentrant" in kwargs:
        return _bool(kwargs["use_reentrant"])
    return None  # the library default decides; not judged


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
