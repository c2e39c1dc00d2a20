"""What an adapter calls: the checked collator it installs, and the dataset pre-scan before training.

    collator = HookedCollator(manager, trainer.data_collator)   # every batch through vlm_dpo_collate
    summary = scan_dataset(manager, train_dataset, trainer.data_collator, output_dir=args.output_dir)
    summary.raise_for_errors()                                   # stop before step 0, naming every row
    train_dataset = train_dataset.select(keep_rows(len(train_dataset), summary))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.collation.checkers import PairCheckers
from vlm_dpo_plugins.collation.plugin import PairChecks
from vlm_dpo_plugins.collation.report import CollationSummary, ReportFile
from vlm_dpo_plugins.types import Finding

Collate = Callable[[list[Mapping[str, Any]]], dict[str, Any]]


class HookedCollator:
    """The framework's collator with every batch built through ``vlm_dpo_collate`` (checks, skips, wrappers).

    Attribute reads fall through to the framework's collator, which trainers inspect.
    """

    def __init__(self, manager: Any, collate: Collate) -> None:
        self.manager = manager
        self.collate = collate
        self.checks = PairCheckers(manager)

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self.manager.hook.vlm_dpo_collate(examples=list(examples), collate=self.collate, checks=self.checks)
        # With the collation checks blocked, no plugin answers: the framework's collator alone builds the batch.
        return self.collate(list(examples)) if batch is None else batch

    def __getattr__(self, name: str) -> Any:
        if name in ("manager", "collate", "checks"):  # not set yet (unpickling): never recurse
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
    plugin = _collation_plugin(manager)
    if plugin is None:
        return CollationSummary()
    checks = PairCheckers(manager)
    return plugin.scan(examples, collate, checks, batch_size=batch_size, limit=limit, output_dir=output_dir)


def keep_rows(total: int, summary: CollationSummary, row_indices: Sequence[int] | None = None) -> list[int]:
    """The positions in ``range(total)`` whose row the scan neither skipped nor failed.

    ``row_indices``: the row index each position carries (``collation.row_index_key``), when rows are named by
    something other than their position (an adapter that left rows out of the file before loading it).
    """
    dropped = summary.skipped_rows | {finding.row for finding in summary.errors}
    rows = range(total) if row_indices is None else row_indices
    return [position for position, row in zip(range(total), rows, strict=True) if row not in dropped]


def collation_report(manager: Any) -> ReportFile | None:
    """The report file the collation checks of this run write (``collation.report_path``); None when blocked.

    Findings made outside the collation (the file checks before a framework reads its data, an encoder that
    rejected a row) go into the same file, after the run's first lines.
    """
    plugin = _collation_plugin(manager)
    return None if plugin is None else plugin.report


def record_findings(
    manager: Any, decided: list[tuple[Finding, str]], summary: CollationSummary, origin: str
) -> None:
    """Findings made outside the collation, decided by the policies, counted in ``summary`` and reported."""
    summary.add(decided, 0)
    report = collation_report(manager)
    if report is not None and summary.report_path:
        report.write(decided, Path(summary.report_path), origin)


def _collation_plugin(manager: Any) -> PairChecks | None:
    plugin = manager.get_plugin("collation")
    return plugin if isinstance(plugin, PairChecks) else None  # blocked, or replaced by another of that name
