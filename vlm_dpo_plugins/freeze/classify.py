"""Sort a VLM's parameters into vision / projector / language / other by module name.

Projector markers are tested first because some projectors live inside the vision
module (Qwen2-VL's ``visual.merger``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PROJECTOR_MARKERS = frozenset(
    {"multi_modal_projector", "mm_projector", "merger", "connector", "aligner", "visual_projection", "mlp1"}
)
VISION_MARKERS = frozenset(
    {"vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder", "vision_embed_tokens", "vpm"}
)
LANGUAGE_MARKERS = frozenset({"language_model", "lm_head", "embed_tokens", "text_model", "llm"})

_BLOCK_INDEX = re.compile(r"\.(?:layers|blocks|layer)\.(\d+)\.")


def group_of(name: str) -> str:
    parts = name.split(".")
    if PROJECTOR_MARKERS.intersection(parts):
        return "projector"
    if VISION_MARKERS.intersection(parts):
        return "vision"
    if LANGUAGE_MARKERS.intersection(parts):
        return "language"
    # A bare causal LM nests its decoder as "model.layers.N" / "model.norm".
    if len(parts) >= 2 and parts[0] == "model" and parts[1] in ("layers", "norm", "rotary_emb"):
        return "language"
    return "other"


def classify(names: Iterable[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {"vision": [], "projector": [], "language": [], "other": []}
    for name in names:
        groups[group_of(name)].append(name)
    return groups


def last_blocks(names: Iterable[str], count: int) -> set[str]:
    """The names belonging to the last ``count`` numbered blocks (``...layers.N...``) among ``names``."""
    if count <= 0:
        return set()
    indexed = [(int(match.group(1)), name) for name in names if (match := _BLOCK_INDEX.search(name))]
    if not indexed:
        return set()
    indices = sorted({index for index, _ in indexed})
    kept = set(indices[-count:])
    return {name for index, name in indexed if index in kept}
