"""Where every row of a training file went, in one log line: rows in = training + left out + dropped.

A framework that drops rows while preprocessing (ms-swift deletes pairs it cannot encode,
LLaMA-Factory conversations it cannot align) says so per row at best; this line puts its
count beside the rows the checks left out, so no row is unaccounted for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass


@dataclass(frozen=True)
class RowAccount:
    source: str
    framework: str
    rows_in: int
    skipped_by_file_checks: int
    loaded: int
    """Rows in the framework's training set after its own preprocessing."""
    skipped_by_prescan: int | None = None
    """Rows the collation pre-scan left out; None where the checks run per batch only."""

    @property
    def dropped_by_framework(self) -> int:
        return self.rows_in - self.skipped_by_file_checks - self.loaded

    @property
    def training(self) -> int:
        return self.loaded - (self.skipped_by_prescan or 0)

    def log(self, logger: logging.Logger) -> None:
        parts = [
            f"{self.training} training",
            f"{self.skipped_by_file_checks} left out by the file checks",
            f"{self.skipped_by_prescan} left out by the collation pre-scan"
            if self.skipped_by_prescan is not None
            else "the collation checks run per batch",
            f"{self.dropped_by_framework} dropped by {self.framework}",
        ]
        line = f"vlm-dpo: rows of {self.source}: {self.rows_in} in; " + ", ".join(parts)
        if self.dropped_by_framework:
            logger.warning(
                "%s (%s's own log above names them; from here on findings name rows of %s's dataset, not of the file)",
                line,
                self.framework,
                self.framework,
            )
        else:
            logger.info(line)
