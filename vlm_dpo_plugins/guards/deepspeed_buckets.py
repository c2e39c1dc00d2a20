"""DeepSpeed ZeRO bucket sizes from the model's shape, the ZeRO stage, the world size and the gradient dtype.

DeepSpeed's defaults (``reduce_bucket_size`` and ``allgather_bucket_size`` of 5e8
elements) were chosen for text-only models of tens of billions of parameters. For a
vision-language model in bf16 they cost gigabytes of bucket buffers that compete
with the image-token activations, and a 2B-7B model fills only a handful of them
per backward pass, so little communication overlaps. The rule here sizes buckets
from the hidden size (the rule transformers applies to ``"auto"`` values), keeps
every rank's share of a collective large enough to stay bandwidth-bound, and caps
the buffers' memory. The reasoning, with the reports behind it, is in
docs/deepspeed.md.

Everything is counted in elements, as DeepSpeed counts them.
"""

from __future__ import annotations

BUCKET_MEMORY_BUDGET_BYTES = 1 << 30
"""What the buffers of one bucket kind may take on a device."""

OVERLAP_BUFFER_FACTOR = 4.5
"""DeepSpeed's own estimate: with ``overlap_comm`` a bucket setting costs about 4.5 buckets' worth of memory."""

BUCKET_ALIGNMENT = 2
"""DeepSpeed's ZeRO 1-2 asserts ``allgather_bucket_size`` is a multiple of its 4-byte NCCL alignment (2 elements)."""

MIN_ELEMENTS_PER_RANK = 1_000_000
"""Each rank's slice of a bucket (bucket / world size); smaller slices make collectives latency-bound."""

PREFETCH_FRACTION_OF_HIDDEN_SQUARED = 0.9
PERSISTENCE_MULTIPLE_OF_HIDDEN = 10

BYTES_PER_ELEMENT = {"bf16": 2, "fp16": 2, "fp32": 4}


def bucket_memory_ceiling(dtype: str) -> int:
    """The largest even bucket (elements) whose buffers fit ``BUCKET_MEMORY_BUDGET_BYTES`` with overlap on."""
    elements = int(BUCKET_MEMORY_BUDGET_BYTES // (OVERLAP_BUFFER_FACTOR * _bytes_per_element(dtype)))
    return elements - elements % BUCKET_ALIGNMENT


def deepspeed_bucket_sizes(
    trainable_parameters: int,
    hidden_size: int,
    zero_stage: int,
    world_size: int = 1,
    dtype: str = "bf16",
) -> dict[str, int]:
    """Bucket settings (DeepSpeed ``zero_optimization`` key -> elements) for one run; only keys the stage reads.

    - ``reduce_bucket_size`` (stages 1-3): ``hidden_size**2`` (one h x h weight matrix per
      bucket), raised to ``world_size * MIN_ELEMENTS_PER_RANK`` so each rank's slice stays
      bandwidth-bound, lowered to the memory ceiling for ``dtype``, and never more than
      the trainable parameters, because DeepSpeed allocates the full bucket up front; then
      rounded up to an even count, which DeepSpeed requires of ``allgather_bucket_size``.
    - ``allgather_bucket_size`` (stages 1-2): the same value; it chunks the gather of the
      updated partitions, which has the same per-rank slice and memory trade-off.
    - ``stage3_prefetch_bucket_size`` (stage 3): ``0.9 * hidden_size**2``, at most the memory
      ceiling: the coordinator fetches about one projection ahead, not a whole layer.
    - ``stage3_param_persistence_threshold`` (stage 3): ``10 * hidden_size``: norms and biases
      (h elements) stay whole on every rank instead of costing one tiny all-gather each,
      while every h x h matrix is still partitioned.

    ``trainable_parameters`` counts what the optimizer updates (ZeRO 1-2 reduce and gather
    only those); ``dtype`` is the dtype gradients are reduced in (``bf16``, ``fp16``, ``fp32``).
    Stage 0 (ZeRO off) has no buckets and returns ``{}``.
    """
    _require_positive_int("trainable_parameters", trainable_parameters)
    _require_positive_int("hidden_size", hidden_size)
    _require_positive_int("world_size", world_size)
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage is {zero_stage!r}; expected 0, 1, 2 or 3")
    ceiling = bucket_memory_ceiling(dtype)
    if zero_stage == 0:
        return {}

    rank_slice_floor = world_size * MIN_ELEMENTS_PER_RANK
    # The memory ceiling wins over the rank-slice floor: an OOM is worse than a slow collective.
    communication_bucket = min(max(hidden_size * hidden_size, rank_slice_floor), ceiling, trainable_parameters)
    # Rounded up: only an odd width or parameter count can make it odd, and one spare element costs nothing.
    communication_bucket += -communication_bucket % BUCKET_ALIGNMENT
    if zero_stage in (1, 2):
        return {"reduce_bucket_size": communication_bucket, "allgather_bucket_size": communication_bucket}
    prefetch = int(PREFETCH_FRACTION_OF_HIDDEN_SQUARED * hidden_size * hidden_size)
    return {
        "reduce_bucket_size": communication_bucket,
        "stage3_prefetch_bucket_size": min(prefetch, ceiling),
        "stage3_param_persistence_threshold": PERSISTENCE_MULTIPLE_OF_HIDDEN * hidden_size,
    }


def model_hidden_size(model_config: object) -> int | None:
    """The widest ``hidden_size`` of a (duck-typed) model config and its text/vision sub-configs, or None.

    A VLM's gradient volume is dominated by its language model, whose width is the largest
    of the three; transformers picks the largest width for ``"auto"`` too.
    """
    widths = []
    configs = (model_config, getattr(model_config, "text_config", None), getattr(model_config, "vision_config", None))
    for config in configs:
        width = getattr(config, "hidden_size", None)
        if isinstance(width, int) and not isinstance(width, bool) and width > 0:
            widths.append(width)
    return max(widths, default=None)


def _bytes_per_element(dtype: str) -> int:
    if dtype not in BYTES_PER_ELEMENT:
        raise ValueError(f"dtype is {dtype!r}; expected one of {sorted(BYTES_PER_ELEMENT)}")
    return BYTES_PER_ELEMENT[dtype]


def _require_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} is {value!r}; expected an integer >= 1")
