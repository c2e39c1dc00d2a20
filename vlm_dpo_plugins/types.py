"""Plain data passed through the hooks.

Hooks never see a framework object: adapters translate their framework's state
into these types (tensors, modules, names, plain numbers) before calling a hook.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class Severity(str, enum.Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class Finding:
    """One thing a check or detector found: what, where, and the setting or edit that fixes it."""

    code: str
    severity: Severity
    message: str
    fix: str = ""
    row: int | None = None
    field: str | None = None
    source: str = ""
    step: int | None = None
    """The optimizer step a detector saw the symptom at; None for data findings."""

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        if self.step is not None:
            where.append(f"step {self.step}")
        prefix = f"[{self.severity.value}] {self.code}" + (f" ({', '.join(where)})" if where else "")
        suffix = f" Fix: {self.fix}" if self.fix else ""
        return f"{prefix}: {self.message}{suffix}"


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the pair checks look for; None where the tokenizer has no such token."""

    image: int | None = None
    bos: int | None = None
    eos: int | None = None
    pad: int | None = None
    all: frozenset[int] = frozenset()
    """Every special (control) id, so response text can be told apart from markup."""


@dataclass(frozen=True)
class TokenizedSequence:
    """One side of a pair as the model sees it: real tokens only (padding removed) and which of them train."""

    input_ids: list[int]
    response_mask: list[int]
    """1 where the token is a trained response token (completion mask, or labels != -100), else 0."""
    text: str | None = None
    """The response text when known (decoded without special tokens, or from the raw row)."""


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair after tokenization, in the same form whichever framework collated it.

    ``image_tokens`` lists how many image tokens each of the row's images needs
    (fixed per image for LLaVA-style models, ``prod(grid_thw) / merge_size**2`` for
    Qwen2-VL); None when that is unknown. ``max_length`` is the collator's
    truncation length when known.
    """

    row: int
    chosen: TokenizedSequence
    rejected: TokenizedSequence
    special: SpecialTokens = SpecialTokens()
    num_images: int | None = None
    image_tokens: tuple[int, ...] | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class RunContext:
    """What the adapter knows about the run, in framework-neutral terms."""

    framework: str
    framework_version: str = ""
    model_type: str | None = None
    world_size: int = 1
    rank: int = 0
    uses_peft: bool = False
    uses_deepspeed: bool = False
    deepspeed_stage: int | None = None
    uses_fsdp: bool = False
    fsdp_version: int | None = None
    """1 (flat parameters) or 2 (``fully_shard``, per-parameter shards) when ``uses_fsdp``."""
    gradient_checkpointing: bool = False
    mixed_precision: str | None = None  # "bf16", "fp16" or None
    output_dir: str | None = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class PreferenceLogps:
    """Summed response log-probabilities, one value per pair, for the policy and the reference.

    The reference may be None for reference-free variants (SimPO). Token counts are
    the response tokens summed over. ``extras`` carries variant-specific tensors
    (e.g. log-probs under a corrupted image for mDPO) so new loss variants need no
    new hook signature. ``vlm_dpo_plugins.losses.logprobs`` builds all of these.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    chosen_token_count: torch.Tensor | None = None
    rejected_token_count: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LossInputs:
    """What a loss variant needs from the adapter beyond policy log-probs, so it runs only the forwards needed."""

    reference: bool = True
    token_counts: bool = False
    extras: tuple[str, ...] = ()
    """Keys of ``PreferenceLogps.extras`` the variant reads."""


@dataclass
class LossOutput:
    """Per-pair losses and implicit rewards, plus any metrics the variant wants logged."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GradNorms:
    """Gradient norms measured before clipping: over every parameter, and per parameter group."""

    total: float
    groups: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepSignals:
    """What the guards look at before an optimizer step. Gradient norms are measured before clipping."""

    step: int
    loss: float
    grad_norm: float | None
    learning_rate: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    group_grad_norms: Mapping[str, float] = field(default_factory=dict)
    learning_rate_scale: float = 1.0
    """After the step (``vlm_dpo_after_optimizer_step``): the factor it was taken with; 1.0 when skipped."""


ParameterGroups = Mapping[str, list[str]]
"""Group name (``vision``, ``projector``, ``language``, ``other``) to the parameter names in it."""

PluginState = Mapping[str, Any]
