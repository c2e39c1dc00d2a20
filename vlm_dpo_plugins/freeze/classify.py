"""Sort a VLM's parameters into vision / projector / language / other by module name.

A known ``model_type`` is classified by its row in :mod:`vlm_dpo_plugins.freeze.registry`;
names that row does not cover, and every name of an unknown type, go through the
generic markers (``vision_tower``, ``visual``, ``multi_modal_projector``, ``merger``,
``language_model``, ...). A name nothing recognises lands in ``other`` and is
reported as unmatched, so a gap in the table is visible instead of silently frozen.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vlm_dpo_plugins.freeze.registry import BARE_DECODER_PARTS, GENERIC_MARKERS, LAYOUTS

GROUPS = ("vision", "projector", "language", "other")

# A numbered block inside a stack: "...layers.3...", "...blocks.11...", "...encoder_layers.0...".
_BLOCK_CONTAINER = re.compile(r"(?:^|_|res)(?:layers?|blocks?)$")


@dataclass(frozen=True)
class Classification:
    groups: dict[str, list[str]]
    unmatched: tuple[str, ...]
    """Names no registry pattern or generic marker recognised (they are in ``other``)."""
    generic: tuple[str, ...]
    """Names sorted by the generic markers: all of an unknown type's, or a known type's that its row missed."""


def classify_names(names: Iterable[str], model_type: str | None = None) -> Classification:
    patterns = _patterns(model_type)
    groups: dict[str, list[str]] = {group: [] for group in GROUPS}
    unmatched, generic = [], []
    for name in names:
        parts = tuple(name.split("."))
        group = _by_registry(parts, patterns)
        if group is None:
            group = _by_markers(parts)
            if group is None:
                unmatched.append(name)
                group = "other"
            else:
                generic.append(name)
        groups[group].append(name)
    return Classification(groups=groups, unmatched=tuple(unmatched), generic=tuple(generic))


def classify(names: Iterable[str], model_type: str | None = None) -> dict[str, list[str]]:
    return classify_names(names, model_type).groups


def group_of(name: str, model_type: str | None = None) -> str:
    groups = classify([name], model_type)
    return next(group for group, members in groups.items() if members)


@functools.cache
def _patterns(model_type: str | None) -> tuple[tuple[tuple[str, ...], str], ...]:
    layout = LAYOUTS.get(model_type) if model_type else None
    return tuple(layout.patterns()) if layout else ()


def _find(parts: Sequence[str], pattern: Sequence[str]) -> int:
    """Start of the first run of ``pattern`` in ``parts``, or -1."""
    width = len(pattern)
    for start in range(len(parts) - width + 1):
        if tuple(parts[start : start + width]) == tuple(pattern):
            return start
    return -1


def _by_registry(parts: Sequence[str], patterns) -> str | None:
    best: tuple[int, int] | None = None  # (pattern length, -start): longest first, then outermost
    best_group = None
    for pattern, group in patterns:
        start = _find(parts, pattern)
        if start >= 0 and (best is None or (len(pattern), -start) > best):
            best, best_group = (len(pattern), -start), group
    return best_group


def _by_markers(parts: Sequence[str]) -> str | None:
    names = set(parts)
    for group, markers in GENERIC_MARKERS:
        if markers & names:
            return group
    if any(a == "model" and b in BARE_DECODER_PARTS for a, b in itertools.pairwise(parts)):
        return "language"
    return None


def vision_blocks(vision_names: Iterable[str], model_type: str | None = None) -> list[list[str]]:
    """The vision group's numbered blocks in forward order, each as its parameter names.

    Stacks (``...encoder.layers``, ``...blocks``) are ordered by where their first
    parameter appears, which follows module registration and so the forward pass
    (Mllama's ``transformer.layers`` before ``global_transformer.layers``); blocks
    inside a stack by index. A registry row's ``vision_stacks`` narrows the choice
    where other numbered modules live in the vision group (Janus's VQ decoder).
    """
    stacks: dict[str, dict[int, list[str]]] = {}
    for name in vision_names:
        parts = name.split(".")
        for position in range(1, len(parts) - 1):
            if parts[position].isdigit() and _BLOCK_CONTAINER.search(parts[position - 1]):
                stack = ".".join(parts[:position])
                stacks.setdefault(stack, {}).setdefault(int(parts[position]), []).append(name)
                break
    layout = LAYOUTS.get(model_type) if model_type else None
    order = list(stacks)
    if layout and layout.vision_stacks:
        wanted = [tuple(pattern.split(".")) for pattern in layout.vision_stacks]
        rank = {stack: _stack_rank(stack, wanted) for stack in stacks}
        order = sorted((stack for stack in stacks if rank[stack] is not None), key=rank.__getitem__)
    return [stacks[stack][index] for stack in order for index in sorted(stacks[stack])]


def _stack_rank(stack: str, wanted: list[tuple[str, ...]]) -> int | None:
    parts = tuple(stack.split("."))
    return next((rank for rank, pattern in enumerate(wanted) if parts[-len(pattern) :] == pattern), None)


def last_blocks(names: Iterable[str], count: int, model_type: str | None = None) -> set[str]:
    """The names of the last ``count`` vision blocks (see :func:`vision_blocks`) among ``names``."""
    if count <= 0:
        return set()
    return {name for block in vision_blocks(names, model_type)[-count:] for name in block}
