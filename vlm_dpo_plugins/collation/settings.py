"""Settings of the collation checks (config section ``collation``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vlm_dpo_plugins.collation.codes import CHECKS
from vlm_dpo_plugins.validation import FieldError, nearest, require

Policy = Literal["error", "skip", "warn", "off"]


@dataclass
class CollationConfig:
    enabled: bool = True
    policy: dict[str, Policy] = field(default_factory=dict)
    """Per-check overrides, e.g. ``{identical-pair: skip}``; checks not named use ``default_policy`` or their own."""
    default_policy: Policy | None = None
    """When set, the policy of every check not named in ``policy`` (instead of each check's built-in default)."""
    report_path: str | None = None
    """JSONL file of skipped and warned rows; None writes ``collation_report.jsonl`` in the run's output dir."""
    row_index_key: str = "row_index"
    """Example key holding the dataset row index; it is removed before the framework's collator sees the row."""
    verify_images: bool = True
    """Open every image path or bytes of a row with Pillow (header and checksums, no decoding) before collation."""
    prescan: bool = True
    """Check the whole training set before step 0 (one pass of the framework's collator over every row, no model),
    so errors stop the run before any GPU time is spent and skipped rows are left out of the dataset."""
    check_files: bool = True
    """Check the raw training files LLaMA-Factory and ms-swift read (each row, each image) before they load them:
    errors stop before the framework's preprocessing, skipped rows never reach it."""

    def __post_init__(self) -> None:
        for code in self.policy:
            if code not in CHECKS:
                raise FieldError(
                    f"policy.{code}", f"is not a check; checks: {sorted(CHECKS)}{nearest(code, sorted(CHECKS))}"
                )
        require(bool(self.row_index_key), "row_index_key", self.row_index_key, "a non-empty example key")
        require(self.report_path != "", "report_path", self.report_path, "a file path or null")

    def policy_for(self, code: str) -> str | None:
        """The configured policy of a built-in check, or None for a check this package does not define."""
        if code in self.policy:
            return self.policy[code]
        if code not in CHECKS:
            return None
        return self.default_policy or CHECKS[code].default_policy
