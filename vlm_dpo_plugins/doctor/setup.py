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

from vlm_dpo_plugins.config_files import parse_json, parse_yaml, read_text
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.shown import clipped, shown, shown_path
from vlm_dpo_plugins.types import Finding, Severity

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
    problems: list[Finding] = field(default_factory=list)
    """Values that cannot be what their key means (``lora_alpha: "abc"``): findings; the rules skip them."""

    def shown(self, name: str, value: Any) -> str:
        return f"{value} (the default)" if name in self.defaulted else str(value)


def read_setup(path: Path, framework: str | None = None) -> TrainingSetup:
    """Raises ``ConfigError`` for a file that cannot be read at all; a bad value is a finding in ``problems``."""
    raw = _load(path)
    framework = framework or _detect(raw, path)
    reader = {"llamafactory": _llamafactory, "swift": _swift, "trl": _trl}[framework]
    setup = TrainingSetup(framework=framework, source=path, raw=raw)
    reader(setup, _Values(raw, setup))
    return setup


class _Values:
    """Reads keys with the framework's defaults, remembering which values were defaulted.

    The typed readers (``number``, ``integer``, ``text``) turn a value the framework would refuse into a
    finding naming the key and return None, so one bad value neither crashes the lint nor hides the others.
    """

    def __init__(self, raw: dict[str, Any], setup: TrainingSetup) -> None:
        self.raw, self.setup, self.defaulted = raw, setup, setup.defaulted

    def get(self, key: str, default: Any = None, name: str | None = None) -> Any:
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key]
        self.defaulted.add(name or key)
        return default

    def number(self, key: str, default: float | None) -> float | None:
        value = self.get(key, default)
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return None if value is None else float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads 5e-5 as text; command lines are text
                return float(value)
            except ValueError:
                pass
        return self.bad(key, value, "a number")

    def integer(self, key: str, default: int | None, minimum: int | None = None) -> int | None:
        value = self.get(key, default)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 20:
            value = int(value)
        if value is None or (
            isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)
        ):
            return value
        return self.bad(key, value, "a whole number" + (f" >= {minimum}" if minimum is not None else ""))

    def text(self, key: str, default: str | None) -> str | None:
        value = self.get(key, default)
        if value is None or isinstance(value, str):
            return value
        return self.bad(key, value, "text")

    def bad(self, key: str, value: Any, expected: str) -> None:
        self.setup.problems.append(
            Finding(
                "config-value",
                Severity.ERROR,
                f"{key} is {shown(value)}; expected {expected}: {self.setup.framework} refuses the config",
                f"set {key} to {expected}, or remove it for the default",
                field=key,
                source=f"doctor:{self.setup.framework}",
            )
        )
        return None


def _load(path: Path) -> dict[str, Any]:
    text = read_text(path, "config file")
    named = f"config file {shown_path(path)}"
    if path.suffix == ".json":
        value = parse_json(text, named)
        return _from_arguments(value) if isinstance(value, list) else _plain(value, path)
    if path.suffix in (".yaml", ".yml"):
        return _plain(parse_yaml(text, named) or {}, path)
    try:
        words = shlex.split(text.replace("\\\n", " "), comments=True)
    except ValueError as error:  # "No closing quotation", "No escaped character"
        raise ConfigError(
            f"{named} cannot be read as a command line: {error}. Fix: balance the quotes (or escape the quote)"
        ) from None
    return _from_arguments(words)


def _plain(value: Any, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(
            f"config file {shown_path(path)} holds a {type(value).__name__} ({shown(value)}); expected a mapping of "
            "settings"
        )
    if not all(isinstance(key, str) for key in value):
        key = next(key for key in value if not isinstance(key, str))
        raise ConfigError(f"config file {shown_path(path)}: the key {shown(key)} is not a setting name")
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
        values[key] = _argument_value(following[0]) if len(following) == 1 else following or True
    return values


def _argument_value(text: str) -> Any:
    """A command-line value as the framework's parser would type it: YAML scalars, else the text itself."""
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError):
        return text
    return value if isinstance(value, (str, int, float, bool)) or value is None else text


def _detect(raw: dict[str, Any], path: Path) -> str:
    if raw.keys() & SWIFT_KEYS:
        return "swift"
    if raw.keys() & LLAMAFACTORY_KEYS:
        return "llamafactory"
    return "trl"


def _targets(values: _Values, key: str, default: Any) -> list[str]:
    value = values.get(key, default)
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(part, str) for part in value):
        return list(value)
    values.bad(key, value, "module names (a comma-separated string or a list of names)")
    return []


def _deepspeed(setup: TrainingSetup, values: _Values) -> None:
    value = values.get("deepspeed")
    if not value:
        return
    if isinstance(value, dict):
        setup.deepspeed_source = "(inline)"
        setup.deepspeed = value
        return
    if not isinstance(value, str):
        values.bad("deepspeed", value, "the path of a DeepSpeed JSON file (or ms-swift's zero2, zero3, ...)")
        return
    setup.deepspeed_source = value
    candidate = Path(value)
    if not candidate.is_absolute():
        candidate = setup.source.parent / candidate
    try:
        if not candidate.is_file():
            return  # deepspeed_rule names it, unless it is one of ms-swift's built-in names
        config = parse_json(read_text(candidate, "DeepSpeed config"), f"DeepSpeed config {shown_path(candidate)}")
    except (ConfigError, OSError, ValueError) as error:
        problem = clipped(str(error), 300)
    else:
        if isinstance(config, dict):
            setup.deepspeed = config
            return
        problem = f"DeepSpeed config {shown_path(candidate)} holds a {type(config).__name__}, not an object"
    setup.deepspeed_source = None  # found, so not "not found": this finding says what is wrong with it
    setup.problems.append(
        Finding(
            "deepspeed-config",
            Severity.ERROR,
            f"{problem}: DeepSpeed fails on it at start-up",
            "correct the DeepSpeed JSON file (one object of settings)",
            field="deepspeed",
            source=f"doctor:{setup.framework}",
        )
    )


def _llamafactory(setup: TrainingSetup, values: _Values) -> None:
    setup.dpo = values.get("stage", "sft") == "dpo"
    finetuning = values.get("finetuning_type", "lora")
    setup.lora = finetuning == "lora"
    setup.lora_r = values.integer("lora_rank", 8, minimum=1)
    setup.lora_alpha = values.number("lora_alpha", None) or (setup.lora_r * 2 if setup.lora_r else None)
    setup.rslora = bool(values.get("use_rslora", False))
    setup.lora_targets = _targets(values, "lora_target", "all")
    setup.learning_rate = values.number("learning_rate", 5e-5)
    if finetuning == "full" or (setup.lora and setup.lora_targets == ["all"]):
        # LoRA "all" targets the vision tower only when LLaMA-Factory is told not to freeze it.
        setup.vision_trainable = not values.get("freeze_vision_tower", True)
        setup.projector_trainable = not values.get("freeze_multi_modal_projector", True)
    setup.gradient_checkpointing = not values.get("disable_gradient_checkpointing", False)
    setup.reentrant = bool(values.get("use_reentrant_gc", True))
    setup.bf16 = bool(values.get("bf16", False))
    setup.max_grad_norm = values.number("max_grad_norm", 1.0)
    _deepspeed(setup, values)
    setup.loss = values.text("pref_loss", "sigmoid")
    setup.beta = values.number("pref_beta", 0.1)
    setup.model = values.text("model_name_or_path", None)


def _swift(setup: TrainingSetup, values: _Values) -> None:
    setup.dpo = values.get("rlhf_type", None) == "dpo"
    train_type = values.get("train_type", "lora")
    setup.lora = train_type == "lora"
    setup.lora_r = values.integer("lora_rank", 8, minimum=1)
    setup.lora_alpha = values.number("lora_alpha", 32)
    setup.rslora = bool(values.get("use_rslora", False))
    setup.lora_targets = _targets(values, "target_modules", "all-linear")
    setup.learning_rate = values.number("learning_rate", 1e-4 if setup.lora else 1e-5)
    setup.vision_trainable = not _bool(values.get("freeze_vit", True))
    setup.projector_trainable = not _bool(values.get("freeze_aligner", True))
    setup.gradient_checkpointing = _bool(values.get("gradient_checkpointing", True))
    setup.reentrant = _reentrant(values)
    setup.bf16 = _bool(values.get("bf16", False)) or values.get("torch_dtype", None) == "bfloat16"
    setup.max_grad_norm = values.number("max_grad_norm", 1.0)
    _deepspeed(setup, values)
    setup.loss = values.text("loss_type", "sigmoid")
    setup.beta = values.number("beta", 0.1)
    setup.model = values.text("model", None)


def _trl(setup: TrainingSetup, values: _Values) -> None:
    setup.lora = _bool(values.get("use_peft", False))
    setup.lora_r = values.integer("lora_r", 16, minimum=1)
    setup.lora_alpha = values.number("lora_alpha", 32)
    setup.rslora = _bool(values.get("use_rslora", False))
    setup.lora_targets = _targets(values, "lora_target_modules", None)
    setup.learning_rate = values.number("learning_rate", 1e-6)
    if not setup.lora:
        # Stock trl.DPOTrainer trains every parameter of the model it is given.
        setup.vision_trainable = setup.projector_trainable = True
    setup.gradient_checkpointing = _bool(values.get("gradient_checkpointing", False))
    setup.reentrant = _reentrant(values)
    setup.bf16 = _bool(values.get("bf16", False))
    setup.max_grad_norm = values.number("max_grad_norm", 1.0)
    _deepspeed(setup, values)
    setup.loss = values.text("loss_type", "sigmoid")
    setup.beta = values.number("beta", 0.1)
    setup.model = values.text("model_name_or_path", None)


def _reentrant(values: _Values) -> bool | None:
    key = "gradient_checkpointing_kwargs"
    kwargs = values.get(key, None)
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except (ValueError, RecursionError):
            return values.bad(key, kwargs, 'a JSON object such as \'{"use_reentrant": false}\'')
    if kwargs is not None and not isinstance(kwargs, dict):
        return values.bad(key, kwargs, 'a mapping such as {"use_reentrant": false}')
    if isinstance(kwargs, dict) and "use_reentrant" in kwargs:
        return _bool(kwargs["use_reentrant"])
    return None  # the library default decides; not judged


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
