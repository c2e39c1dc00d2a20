"""What an adapter calls: the checked collator it installs, and the dataset pre-scan before training.

    collator = HookedCollator(manager, trainer.data_collator)   # every batch through vlm_dpo_collate
    summary = scan_dataset(manager, train_dataset, trainer.data_collator, output_dir=args.output_dir)
    summary.raise_for_errors()                                   # stop before step 0, naming every row
    train_dataset = train_dataset.select(keep_rows(len(train_dataset), summary))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from vlm_dpo_plugins.collation.plugin import PairChecks
from vlm_dpo_plugins.collation.report import CollationSummary

Collate = Callable[[list[Mapping[str, Any]]], dict[str, Any]]


class HookedCollator:
    """The framework's collator with every batch built through ``vlm_dpo_collate`` (checks, skips, wrappers).

    Attribute reads fall through to the framework's collator, which trainers inspect.
    """

    def __init__(self, manager: Any, collate: Collate) -> None:
        self.manager = manager
        self.collate = collate
        _bound_checks(manager)

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, Any]:
        return self.manager.hook.vlm_dpo_collate(examples=list(examples), collate=self.collate)

    def __getattr__(self, name: str) -> Any:
        if name in ("manager", "collate"):  # not set yet (unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.collate, name)


def scan_dataset(
    manager: Any,
    examples: Iterable[Mapping[str, Any]],
    collate: Collate,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    output_dir: str | None = None,
) -> CollationSummary:
    """Check a dataset before training: every row through the framework's collator and the same checks.

    Nothing raises here; ``summary.errors`` holds the rows whose policy is ``error``
    (``summary.raise_for_errors()`` stops with all of them named), ``skipped_rows``
    the rows to leave out, and the report file lists the skipped and warned rows.
    Row indices are positions in ``examples`` unless a row carries ``collation.row_index_key``.
    """
    checks = _bound_checks(manager)
    if checks is None:
        return CollationSummary()
    return checks.scan(examples, collate, batch_size=batch_size, limit=limit, output_dir=output_dir)


def keep_rows(total: int, summary: CollationSummary, row_indices: Sequence[int] | None = None) -> list[int]:
    """The positions in ``range(total)`` whose row the scan neither skipped nor failed.

    ``row_indices``: the row index each position carries (``collation.row_index_key``), when rows are named by
    something other than their position (an adapter that left rows out of the file before loading it).
    """
    dropped = summary.skipped_rows | {finding.row for finding in summary.errors}
    rows = range(total) if row_indices is None else row_indices
    return [position for position, row in zip(range(total), rows, strict=True) if row not in dropped]


def _bound_checks(manager: Any) -> PairChecks | None:
    checks = manager.get_plugin("collation")
    if not isinstance(checks, PairChecks):  # blocked, or replaced by another plugin of that name
        return None
    checks.bind(manager)
    return checks
