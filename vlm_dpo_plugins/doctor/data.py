"""``vlm-dpo doctor --data``: every row of a preference file through the checks the raw data allows.

Rows are streamed; what is kept per row is its image keys (and, with a model, its texts),
so a large file costs little memory. Images are checked once per distinct file, in
parallel, after the rows; lengths are measured in batches with the model's tokenizer.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.doctor.images import check_images, resolve
from vlm_dpo_plugins.doctor.pairs import Pair, RowProblem, malformed, parse_pair
from vlm_dpo_plugins.doctor.rows import BadRow, read_rows
from vlm_dpo_plugins.doctor.text_checks import finding, text_findings
from vlm_dpo_plugins.types import Finding, Severity

LENGTH_BATCH = 512


@dataclass
class DataReport:
    path: Path
    rows: int = 0
    layouts: Counter = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    distinct_images: int = 0
    max_length: int | None = None
    unreadable_rows: set[int] = field(default_factory=set)
    """Lines that are not UTF-8 or not JSON: a framework's loader fails on the whole file for any of them."""

    @property
    def failing_rows(self) -> int:
        return len({f.row for f in self.findings if f.severity is Severity.ERROR})


@dataclass
class _ImageUse:
    row: int
    field: str
    key: str


def check_data(
    path: Path,
    *,
    images_root: Path | None = None,
    model: str | None = None,
    max_length: int | None = None,
    workers: int | None = None,
    progress: Callable[[str, int | None], Callable[[int], None]] | None = None,
    row_limit: int | None = None,
) -> DataReport:
    report = DataReport(path=path, max_length=max_length)
    roots = (images_root,) if images_root is not None else (path.parent, Path.cwd())
    lengths = None
    if model is not None:
        from vlm_dpo_plugins.doctor.lengths import Lengths

        lengths = Lengths(model)
    uses: list[_ImageUse] = []
    targets: dict[str, Any] = {}
    kept_pairs: list[Pair] = []
    tick = progress("rows", None) if progress else None
    for raw in read_rows(path):
        if row_limit is not None and raw.index >= row_limit:
            break
        report.rows += 1
        if tick:
            tick(1)
        pair = _parse(raw.index, raw.value, report)
        if pair is None:
            continue
        report.layouts[pair.layout] += 1
        report.findings += text_findings(pair)
        for position, entry in enumerate(pair.images):
            key, target = resolve(entry, roots)
            targets.setdefault(key, target)
            uses.append(_ImageUse(pair.row, f"images[{position}]", key))
        if lengths is not None:
            kept_pairs.append(pair)
    report.distinct_images = len(targets)
    tick = progress("images", len(targets)) if progress else None
    results = check_images(targets, workers or min(32, 4 * (os.cpu_count() or 1)), tick)
    for use in uses:
        problem = results[use.key].problem
        if problem:
            report.findings.append(
                finding(
                    "image-unreadable",
                    problem,
                    "fix the path (relative paths start from --images-root, default the data file's folder) or "
                    "replace the file, or drop the row",
                    use.row,
                    use.field,
                )
            )
    if lengths is not None and max_length is not None:
        report.findings += _length_findings(kept_pairs, uses, results, lengths, max_length)
    report.findings.sort(key=lambda f: (f.row if f.row is not None else -1, f.code))
    return report


def _parse(row: int, value: Any, report: DataReport) -> Pair | None:
    if isinstance(value, BadRow):
        report.unreadable_rows.add(row)
        report.findings.append(malformed(row, RowProblem(None, value.reason, "fix or remove the line")))
        return None
    try:
        return parse_pair(row, value)
    except RowProblem as problem:
        report.findings.append(malformed(row, problem))
        return None


def _length_findings(pairs, uses, results, lengths, max_length) -> list[Finding]:
    from vlm_dpo_plugins.doctor.lengths import truncation_findings

    sizes_by_row: dict[int, list] = {}
    for use in uses:
        sizes_by_row.setdefault(use.row, []).append(results[use.key].size)
    findings = []
    for start in range(0, len(pairs), LENGTH_BATCH):
        batch = pairs[start : start + LENGTH_BATCH]
        image_tokens = [lengths.image_tokens(sizes_by_row.get(pair.row, [])) for pair in batch]
        for pair, measured in zip(batch, lengths.measure(batch, image_tokens)):
            findings += truncation_findings(pair, measured, max_length)
    return findings
