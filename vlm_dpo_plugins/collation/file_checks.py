"""The raw preference file, checked row by row before a framework loads it.

LLaMA-Factory and ms-swift read the whole file, open images and drop rows of their own while
preprocessing, all before the first batch: a missing image or a line that is not UTF-8 ends
that step with a traceback naming neither row nor field, and a row the framework drops
(ms-swift deletes identical pairs, LLaMA-Factory malformed conversations) is gone with a log
line at best. So the adapters put the file through the row checks of ``preference_data.scan``
(the ones ``vlm-dpo doctor`` runs) first and let the collation policies decide: ``error`` stops
before loading with every row, field and fix named; ``skip`` leaves the row out (the adapter
keeps only ``FileCheck.kept`` of what the framework loads) and writes it to the collation report.
Warnings are left to the live checks, which see the tokens and report each row once.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from vlm_dpo_plugins.collation.policy import PairCheckError, decide
from vlm_dpo_plugins.collation.report import ReportFile
from vlm_dpo_plugins.collation.settings import CollationConfig
from vlm_dpo_plugins.preference_data.scan import scan_file
from vlm_dpo_plugins.types import Finding, Severity

ORIGIN = "file-check"
logger = logging.getLogger("vlm_dpo_plugins.collation")


@dataclass
class FileCheck:
    """What the checks left of one file: the rows read and the ones left out, each with its first finding."""

    path: Path
    rows: int
    skipped: dict[int, Finding] = field(default_factory=dict)

    @property
    def kept(self) -> list[int]:
        return [row for row in range(self.rows) if row not in self.skipped]


@dataclass
class CheckedFiles:
    """The files of one run, checked; and, when the training set holds one file's rows in order, those rows."""

    framework: str
    checks: dict[str, FileCheck] = field(default_factory=dict)
    file_rows: list[int] | None = None
    """The training set's rows as rows of the user's file, else None (several files, a split, a shuffle)."""
    source: str = ""
    """The file (or files) ``rows_in`` counts; empty when the rows cannot be accounted for file by file."""
    rows_in: int = 0
    skipped_before_loading: int = 0


def check_file(
    path: Path,
    config: CollationConfig,
    *,
    framework: str,
    report: ReportFile,
    report_path: Path,
    images_root: Path | None = None,
    row_limit: int | None = None,
) -> FileCheck:
    """Raises ``PairCheckError`` for the rows whose policy is ``error``; returns the rows kept and left out."""
    data = scan_file(path, images_root=images_root, row_limit=row_limit)
    decided = [decide(finding, config) for finding in data.findings]
    errors, skips = [], []
    for finding, action in decided:
        if action == "skip" and finding.row in data.unreadable_rows:
            # The reader makes such a line one bad row, but the framework's loader parses the file as a
            # whole and fails on it: no row of the file can be left out, so the policy here is stricter.
            finding, action = _unskippable(finding, framework), "error"
        if action == "error":
            errors.append(finding)
        elif action == "skip":
            skips.append(finding)
    if errors:
        raise PairCheckError(errors, checks=f"checks of {path}", when=f" before {framework} loaded it")
    check = FileCheck(path, data.rows)
    for finding in skips:
        check.skipped.setdefault(finding.row, finding)
    if skips:
        report.write([(finding, "skip") for finding in skips], report_path, ORIGIN)
        logger.warning(
            "vlm-dpo: %d of the %d rows of %s left out before %s loads it (listed in %s)",
            len(check.skipped),
            check.rows,
            path,
            framework,
            report_path,
        )
    return check


class FileChecks:
    """The file checks of one run: each file checked once, its kept rows handed on, every row accounted for.

    Off (nothing checked, nothing selected) without the collation checks (``report`` None: blocked) or with
    ``collation.check_files: false``.
    """

    def __init__(
        self, framework: str, config: CollationConfig | None, report: ReportFile | None, output_dir: str | None
    ) -> None:
        self.files = CheckedFiles(framework)
        self.enabled = config is not None and report is not None and config.enabled and config.check_files
        self._config, self._report = config, report
        self._report_path = ReportFile.resolve(config.report_path, output_dir) if config is not None else None

    def check(
        self, key: str, path: Path, *, images_root: Path | None = None, row_limit: int | None = None
    ) -> FileCheck:
        if key not in self.files.checks:
            self.files.checks[key] = check_file(
                path,
                self._config,
                framework=self.files.framework,
                report=self._report,
                report_path=self._report_path,
                images_root=images_root,
                row_limit=row_limit,
            )
        return self.files.checks[key]

    def account_for_every_row(self) -> None:
        """The training set is exactly the checked files' kept rows: the row account can name every row."""
        checks = list(self.files.checks.values())
        self.files.source = ", ".join(str(check.path) for check in checks)
        self.files.rows_in = sum(check.rows for check in checks)
        self.files.skipped_before_loading = sum(len(check.skipped) for check in checks)

    def kept(self, dataset: object, key: str) -> object:
        """``dataset`` (what the framework read from file ``key``) without the rows the checks left out."""
        check = self.files.checks.get(key)
        return dataset.select(check.kept) if check is not None and check.skipped else dataset

    @staticmethod
    def checkable(name: str, path: Path, unread_because: str | None = None) -> Path | None:
        """``path`` when the checks read it as the framework will (one local JSON/JSONL file, rows in file order, as
        ``unread_because`` None says); else None, with a notice that dataset ``name`` is checked per batch."""
        if not path.is_file() or path.suffix not in (".json", ".jsonl"):
            unread_because = "it is not one local .json/.jsonl file"
        if unread_because is None:
            return path
        logger.info(
            "vlm-dpo: %s is checked per batch during training, not as a file before loading: %s", name, unread_because
        )
        return None


def _unskippable(finding: Finding, framework: str) -> Finding:
    return dataclasses.replace(
        finding,
        severity=Severity.ERROR,
        message=f"{finding.message}; {framework} reads the file as a whole and fails on such a line, so the row "
        "cannot be left out",
        fix=f"{finding.fix}, before {framework} reads the file",
    )
