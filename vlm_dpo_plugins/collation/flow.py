"""One batch through the checks: raw rows, the framework's own collation, the tokenized pairs.

Rows that must be skipped are left out and the remaining examples collated again
by the same collator, so the batch stays exactly what the framework would build
for those rows, whatever its image layout. The collator only ever sees shallow
copies without the row-index key: TRL's collator rewrites the examples it gets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlm_dpo_plugins.collation.checks import finding
from vlm_dpo_plugins.collation.pairs import (
    IMAGE_COUNT_KEY,
    BatchLayoutError,
    count_images,
    pairs_from_batch,
    response_text,
)
from vlm_dpo_plugins.collation.policy import decide
from vlm_dpo_plugins.collation.settings import CollationConfig
from vlm_dpo_plugins.collation.tokens import TokenFacts
from vlm_dpo_plugins.types import Finding, TokenizedPair

Collate = Callable[[list[Mapping[str, Any]]], dict[str, Any]]


@dataclass
class Inspection:
    """The findings of one batch with their actions, and the batch built for the rows that passed."""

    examples: Sequence[Mapping[str, Any]]
    collate: Collate
    row_index_key: str
    decided: list[tuple[Finding, str]] = field(default_factory=list)
    collated: list[int] = field(default_factory=list)
    """Positions (into ``examples``) of the rows in ``batch``."""
    dropped: set[int] = field(default_factory=set)
    """Positions removed by an ``error`` or ``skip`` finding."""
    batch: dict[str, Any] | None = None
    layout_problem: str | None = None
    collate_errors: dict[int, Exception] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [found for found, action in self.decided if action == "error"]

    @property
    def kept(self) -> list[int]:
        return [position for position in range(len(self.examples)) if position not in self.dropped]

    def final_batch(self) -> dict[str, Any] | None:
        """The batch without the dropped rows: the first collation when nothing was dropped from it."""
        kept = self.kept
        if kept == self.collated:
            return self.batch
        return self.collate(prepare(self.examples, kept, self.row_index_key)) if kept else None


def prepare(examples: Sequence[Mapping[str, Any]], positions: Sequence[int], row_index_key: str) -> list[dict]:
    """The examples as the framework's collator expects them: without the keys the plugins put beside its own."""
    ours = (row_index_key, IMAGE_COUNT_KEY)
    return [{key: value for key, value in examples[p].items() if key not in ours} for p in positions]


def inspect(
    examples: Sequence[Mapping[str, Any]],
    collate: Collate,
    rows: Sequence[int],
    *,
    config: CollationConfig,
    facts: TokenFacts,
    max_length: int | None,
    check_example: Callable[[Mapping[str, Any], int], list[Finding]],
    check_pair: Callable[[TokenizedPair], list[Finding]],
) -> Inspection:
    result = Inspection(examples=examples, collate=collate, row_index_key=config.row_index_key)

    def record(position: int, findings: list[Finding]) -> None:
        for found in findings:
            found, action = decide(found, config)
            if action == "off":
                continue
            result.decided.append((found, action))
            if action in ("error", "skip"):
                result.dropped.add(position)

    for position, example in enumerate(examples):
        record(position, check_example(example, rows[position]))
    candidates = [position for position in range(len(examples)) if position not in result.dropped]
    if not candidates:
        return result
    result.batch, result.collate_errors = _collate_isolating_failures(collate, examples, candidates, config)
    for position, error in result.collate_errors.items():
        record(position, [finding(
            "collate-failed",
            f"the framework's collator raised on this row alone: {type(error).__name__}: {error}",
            "fix the row (its fields, image placeholders and images must match what the collator expects) or drop it",
            rows[position], "row",
        )])
    result.collated = [position for position in candidates if position not in result.collate_errors]
    if result.batch is None:
        return result
    selected = [examples[position] for position in result.collated]
    images_per_row = [count_images(example) for example in selected]
    texts = None
    if facts.decode is None:
        texts = [(response_text(example.get("chosen")), response_text(example.get("rejected"))) for example in selected]
    try:
        pairs = pairs_from_batch(
            result.batch, [rows[position] for position in result.collated], facts,
            images_per_row=None if None in images_per_row else images_per_row,
            texts=texts, max_length=max_length,
        )
    except BatchLayoutError as problem:
        result.layout_problem = str(problem)
        return result
    for position, pair in zip(result.collated, pairs):
        record(position, check_pair(pair))
    return result


def _collate_isolating_failures(
    collate: Collate, examples: Sequence[Mapping[str, Any]], positions: list[int], config: CollationConfig
) -> tuple[dict[str, Any] | None, dict[int, Exception]]:
    """Collate; when that raises, find the rows that fail on their own so the error can name them."""
    try:
        return collate(prepare(examples, positions, config.row_index_key)), {}
    except Exception as batch_error:
        if len(positions) == 1:
            return None, {positions[0]: batch_error}
        failed = {}
        for position in positions:
            try:
                collate(prepare(examples, [position], config.row_index_key))
            except Exception as row_error:
                failed[position] = row_error
        if not failed:
            raise  # every row collates alone, only not together: not a row's fault, and the framework's error says it
        rest = [position for position in positions if position not in failed]
        if not rest:
            # Every row fails on its own: each is named with its own error (a collator that rejects every row of
            # the dataset is named too, row by row, with the same message).
            return None, failed
        return collate(prepare(examples, rest, config.row_index_key)), failed
