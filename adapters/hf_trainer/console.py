"""The adapters' lines in a framework's console output, in that framework's own format."""

from __future__ import annotations

import logging
import os


class _FirstRankInfo(logging.Filter):
    """Info lines from local rank 0 only, as the frameworks print theirs; warnings from every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or os.environ.get("LOCAL_RANK", "0") == "0"


def configure_logging(line_format: str) -> None:
    """A handler for the ``vlm_dpo_plugins`` loggers, unless the application configured one already."""
    package_logger = logging.getLogger("vlm_dpo_plugins")
    if package_logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(line_format))
    handler.addFilter(_FirstRankInfo())
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False
