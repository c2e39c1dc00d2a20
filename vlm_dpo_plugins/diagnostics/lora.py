"""Built-in detector: a LoRA adapter that trains but leaves the model's outputs where they were.

With PEFT, DPO's reference model is the policy with its adapter disabled, so the
implicit rewards ``beta * (log p_policy - log p_reference)`` measure exactly what the
adapter changes. Rewards that stay at ~0 for many logged steps mean the adapter has
no effect: ``lora_alpha`` far below ``r`` (PEFT multiplies the update by alpha / r), a
full-fine-tuning learning rate, or adapters that never receive an update.

The LoRA layers are found by duck typing on PEFT's layer attributes (``lora_A`` and
``lora_B`` containers keyed by adapter name, with ``r`` and ``scaling`` dicts), so the
core never imports peft. The adapters' effective update ``||scaling * B @ A||`` relative
to ``||W||`` confirms the diagnosis and says which of the causes it is.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from vlm_dpo_plugins.types import Finding, PluginState, Severity

CODE = "lora-inert"
# The usual LoRA learning rates; DPO's full-fine-tuning rates (5e-7..5e-6) barely move a zero-initialised B.
LORA_LEARNING_RATES = (1e-4, 2e-4)
LOW_LEARNING_RATE = 5e-5
# PEFT's alpha / r; below this the update reaching the weights is shrunk several-fold.
LOW_SCALING = 0.5


@dataclass(frozen=True)
class LoraLayer:
    """One adapter of one PEFT-style LoRA layer: its settings and the modules that hold its weights."""

    name: str
    adapter: str
    r: int
    alpha: float | None
    scaling: float
    module: torch.nn.Module


@dataclass(frozen=True)
class UpdateSize:
    """How far the adapters move their base weights: ``||scaling * B @ A|| / ||W||`` over the measured layers."""

    median: float
    largest: float
    layers: int


def find_lora_layers(model: torch.nn.Module) -> list[LoraLayer]:
    """Every active adapter of every module that looks like a PEFT LoRA layer."""
    layers = []
    for name, module in model.named_modules():
        if not _looks_like_lora(module):
            continue
        for adapter in _active_adapters(module):
            r = module.r.get(adapter)
            scaling = module.scaling.get(adapter)
            if adapter not in module.lora_A or r is None or scaling is None:
                continue
            alpha = getattr(module, "lora_alpha", {})
            alpha = alpha.get(adapter) if isinstance(alpha, Mapping) else None
            layers.append(LoraLayer(name, adapter, int(r), alpha, float(scaling), module))
    return layers


def _looks_like_lora(module: torch.nn.Module) -> bool:
    containers = (getattr(module, "lora_A", None), getattr(module, "lora_B", None))
    settings = (getattr(module, "r", None), getattr(module, "scaling", None))
    return all(isinstance(c, torch.nn.ModuleDict) for c in containers) and all(isinstance(s, Mapping) for s in settings)


def _active_adapters(module: torch.nn.Module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if isinstance(active, str):
        return [active]
    if isinstance(active, Iterable):
        return list(active)
    return list(module.lora_A.keys())


def update_size(layers: Iterable[LoraLayer]) -> UpdateSize | None:
    """Relative update of each layer whose weights are local floating-point tensors; None if none are."""
    ratios = [ratio for ratio in map(_relative_update, layers) if ratio is not None]
    if not ratios:
        return None
    return UpdateSize(median=statistics.median(ratios), largest=max(ratios), layers=len(ratios))


@torch.no_grad()
def _relative_update(layer: LoraLayer) -> float | None:
    down = _matrix(getattr(layer.module.lora_A[layer.adapter], "weight", None))  # A: r x in
    up = _matrix(getattr(layer.module.lora_B[layer.adapter], "weight", None))  # B: out x r
    base = _matrix(_base_weight(layer.module))
    if down is None or up is None or base is None or up.shape[1] != down.shape[0]:
        return None
    if (up.shape[0], down.shape[1]) != tuple(base.shape):
        return None
    # ||B A||_F^2 = trace((B^T B)(A A^T)): two r x r products instead of the full out x in matrix.
    update_squared = ((up.T @ up) * (down @ down.T)).sum().clamp_min(0)
    base_norm = torch.linalg.vector_norm(base)
    if base_norm == 0:
        return None
    return float(abs(layer.scaling) * update_squared.sqrt() / base_norm)


def _base_weight(module: torch.nn.Module) -> torch.Tensor | None:
    base = module
    while hasattr(base, "base_layer"):  # PEFT nests wrappers; the innermost layer holds W
        base = base.base_layer
    return getattr(base, "weight", None)


def _matrix(weight: object) -> torch.Tensor | None:
    # Sharded (ZeRO-3: empty), quantized (integer) or meta weights say nothing about the update's size.
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0 or not weight.is_floating_point():
        return None
    if weight.is_meta or weight.dim() < 2:
        return None
    return weight.detach().flatten(1).float()


class LoraInertDetector:
    """Counts logged steps whose rewards stay at ~0 in a LoRA run; reports once, naming the settings to change.

    Steps logged while the learning rate is still rising (warm-up) are not counted: an
    adapter may rightly have changed little by then.
    """

    def __init__(self, steps: int, tolerance: float) -> None:
        self.steps = steps
        self.tolerance = tolerance
        self.layers: list[LoraLayer] = []
        self.uses_peft = False
        self.inert_logs = 0
        self.previous_learning_rate: float | None = None
        self.peak_learning_rate: float | None = None
        self.reported = False

    def watch(self, model: torch.nn.Module, uses_peft: bool) -> None:
        self.layers = find_lora_layers(model)
        self.uses_peft = uses_peft

    @property
    def active(self) -> bool:
        return bool(self.layers) or self.uses_peft

    def observe(self, step: int, metrics: Mapping[str, float]) -> Finding | None:
        if not self.active or self.reported:
            return None
        rewards = [metrics.get(key) for key in ("rewards/chosen", "rewards/rejected", "rewards/margins")]
        if rewards[0] is None or rewards[1] is None:
            return None
        learning_rate = metrics.get("learning_rate")
        warming_up = None not in (learning_rate, self.previous_learning_rate) and (
            learning_rate > self.previous_learning_rate
        )
        if learning_rate is not None:
            self.previous_learning_rate = learning_rate
            # The schedule has decayed by the time of the report; the rate the user set is the largest one seen.
            self.peak_learning_rate = max(learning_rate, self.peak_learning_rate or learning_rate)
        if warming_up:
            return None
        if all(abs(value) < self.tolerance for value in rewards if value is not None):
            self.inert_logs += 1
        else:
            self.inert_logs = 0
        if self.inert_logs < self.steps:
            return None
        self.reported = True
        return self._finding(step, self.peak_learning_rate)

    def _finding(self, step: int, learning_rate: float | None) -> Finding:
        settings = describe_settings(self.layers)
        size = update_size(self.layers)
        cause, fix = explain(self.layers, size, learning_rate)
        observed = (
            f"rewards/chosen and rewards/rejected have stayed within {self.tolerance:g} of 0 for {self.inert_logs} "
            f"logged steps (step {step}): with PEFT the reference is the adapter-disabled model, so the LoRA "
            "adapter is not changing the model's outputs"
        )
        details = [f"LoRA {settings}" if settings else "LoRA settings unknown (no PEFT-style LoRA layers found)"]
        details.append(
            f"learning rate {learning_rate:.3g} (largest logged)"
            if learning_rate is not None
            else "learning rate not logged"
        )
        if size is not None:
            details.append(
                f"adapter update ||scaling*B@A||/||W|| median {size.median:.2e}, largest {size.largest:.2e} "
                f"over {size.layers} layers"
            )
        return Finding(
            code=CODE,
            severity=Severity.WARNING,
            message=f"{observed}. {'; '.join(details)}. {cause}",
            fix=fix,
            source="diagnostics",
        )

    def state(self) -> PluginState:
        return {
            "inert_logs": self.inert_logs,
            "previous_learning_rate": self.previous_learning_rate,
            "peak_learning_rate": self.peak_learning_rate,
            "reported": self.reported,
        }

    def load(self, state: Mapping[str, object]) -> None:
        self.inert_logs = int(state.get("inert_logs", 0))
        previous = state.get("previous_learning_rate")
        self.previous_learning_rate = None if previous is None else float(previous)
        peak = state.get("peak_learning_rate")
        self.peak_learning_rate = None if peak is None else float(peak)
        self.reported = bool(state.get("reported", False))


def describe_settings(layers: list[LoraLayer]) -> str:
    """``r=64, lora_alpha=1 (scaling alpha/r = 0.0156)``, or the ranges when layers differ."""
    if not layers:
        return ""
    ranks = sorted({layer.r for layer in layers})
    alphas = sorted({layer.alpha for layer in layers if layer.alpha is not None})
    scalings = sorted({layer.scaling for layer in layers})
    parts = [f"r={_span(ranks)}"]
    if alphas:
        parts.append(f"lora_alpha={_span(alphas)}")
    return f"{', '.join(parts)} (effective scaling {_span(scalings, '.3g')}) on {len(layers)} layers"


def _span(values: list[float], spec: str = "g") -> str:
    low, high = values[0], values[-1]
    return format(low, spec) if low == high else f"{format(low, spec)}..{format(high, spec)}"


def explain(layers: list[LoraLayer], size: UpdateSize | None, learning_rate: float | None) -> tuple[str, str]:
    """The likely cause, and what to change, from the adapters' settings, their update and the learning rate."""
    if size is not None and size.largest == 0:
        return (
            "The adapter weights have not changed at all: no update reached them.",
            "check that the LoRA parameters require grad and are in the optimizer, and that the pairs give a "
            "gradient (identical chosen/rejected or masked responses give none: see the collation checks)",
        )
    fixes = []
    scaling = min((layer.scaling for layer in layers), default=None)
    if scaling is not None and scaling < LOW_SCALING:
        fixes.append(
            f"raise lora_alpha to r or 2r (scaling 1-2 instead of {scaling:.3g}; PEFT multiplies the update by "
            "lora_alpha / r)"
        )
    if learning_rate is not None and learning_rate < LOW_LEARNING_RATE:
        low, high = LORA_LEARNING_RATES
        fixes.append(
            f"use a LoRA learning rate (~{low:g}..{high:g}) instead of {learning_rate:.3g}, a full-fine-tuning rate"
        )
    if fixes:
        return "The adapter's update is too small to matter.", "; ".join(fixes)
    return (
        "The adapter is trained yet the outputs do not move: it may not be active in the forward pass.",
        "check that the trained adapter is the active one (set_adapter) and is not disabled or merged away; "
        "check beta and the loss",
    )
