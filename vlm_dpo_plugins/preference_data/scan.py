"""Every row of a preference file through the checks the raw data allows, in any framework's layout.

Rows are streamed; what is kept per row is its image keys (and, on request, its pair), so a
large file costs little memory. Images are checked once per distinct file, in parallel, after
the rows. ``vlm-dpo doctor`` adds length checks with a model on top; the adapters' file checks
put the findings under the collation policies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vlm_dpo_plugins.preference_data.images import ImageResult, ImageTarget, check_images, locate
from vlm_dpo_plugins.preference_data.pairs import Pair, RowProblem, malformed, parse_pair
from vlm_dpo_plugins.preference_data.rows import BadRow, RawRow, read_rows
from vlm_dpo_plugins.preference_data.text_checks import finding, text_findings
from vlm_dpo_plugins.types import Finding, Severity

Progress = Callable[[str, int | None], Callable[[int], None]]
"""Makes a progress counter for a stage ("rows", "images") of a known or unknown size."""


@dataclass
class DataReport:
    path: Path
    rows: int = 0
    layouts: Counter = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    distinct_images: int = 0
    unreadable_rows: set[int] = field(default_factory=set)
    """Lines that are not UTF-8 or not JSON: a framework's loader fails on the whole file for any of them."""
    pairs: list[Pair] = field(default_factory=list)
    """The rows that parsed, when ``scan_file(keep_pairs=True)``."""
    image_sizes: dict[int, list[tuple[int, int] | None]] = field(default_factory=dict)
    """Per row, each image's (width, height), or None where it could not be opened."""

    @property
    def failing_rows(self) -> int:
        return len({f.row for f in self.findings if f.severity is Severity.ERROR})


@dataclass(frozen=True)
class _ImageUse:
    row: int
    field: str
    key: str


def scan_file(
    path: Path,
    *,
    images_root: Path | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    row_limit: int | None = None,
    keep_pairs: bool = False,
) -> DataReport:
    """Relative image paths start from ``images_root``, else the data file's folder, then the working directory."""
    report = DataReport(path=path)
    roots = (images_root,) if images_root is not None else (path.parent, Path.cwd())
    uses: list[_ImageUse] = []
    targets: dict[str, ImageTarget] = {}
    tick = progress("rows", None) if progress else None
    for raw in read_rows(path):
        if row_limit is not None and raw.index >= row_limit:
            break
        report.rows += 1
        if tick:
            tick(1)
        pair = _parse(raw, report)
        if pair is None:
            continue
        report.layouts[pair.layout] += 1
        report.findings += text_findings(pair)
        for position, entry in enumerate(pair.images):
            target = locate(entry, roots)
            targets.setdefault(target.key, target)
            uses.append(_ImageUse(pair.row, f"images[{position}]", target.key))
        if keep_pairs:
            report.pairs.append(pair)
    report.distinct_images = len(targets)
    results = check_images(targets, workers, progress("images", len(targets)) if progress else None)
    report.findings += _image_findings(uses, results)
    for use in uses:
        report.image_sizes.setdefault(use.row, []).append(results[use.key].size)
    report.findings.sort(key=lambda f: (f.row if f.row is not None else -1, f.code))
    return report


def _parse(raw: RawRow, report: DataReport) -> Pair | None:
    if isinstance(raw.value, BadRow):
        report.unreadable_rows.add(raw.index)
        report.findings.append(malformed(raw.index, RowProblem(None, raw.value.reason, raw.value.fix)))
        return None
    try:
        return parse_pair(raw.index, raw.value)
    except RowProblem as problem:
        report.findings.append(malformed(raw.index, problem))
        return None


def _image_findings(uses: list[_ImageUse], results: dict[str, ImageResult]) -> list[Finding]:
    return [
        finding(
            "image-unreadable",
            results[use.key].problem,
            "fix the path (relative paths start from --images-root, default the data file's folder) or the "
            "image's bytes, or replace the file, or drop the row",
            use.row,
            use.field,
        )
        for use in uses
        if results[use.key].problem
    ]
