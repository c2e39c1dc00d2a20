"""What happens to a finding: ``error`` stops with every failing row named, ``skip`` drops the pair
(counted and reported), ``warn`` keeps it (reported), ``off`` ignores it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from vlm_dpo_plugins.collation.settings import CollationConfig
from vlm_dpo_plugins.errors import VLMDPOError
from vlm_dpo_plugins.types import Finding, Severity

MAX_LISTED_FINDINGS = 20


class PairCheckError(VLMDPOError, ValueError):
    """Preference pairs failed a collation check whose policy is ``error``; lists every row and its fix."""

    def __init__(
        self,
        findings: Iterable[Finding],
        headline: str | None = None,
        *,
        checks: str = "collation checks",
        when: str = "",
    ) -> None:
        """``headline`` replaces the first line; else it reads ``{checks} failed for N row(s){when}: rows``."""
        self.findings = tuple(findings)
        self.rows = sorted({finding.row for finding in self.findings if finding.row is not None})
        super().__init__(_message(self.findings, self.rows, headline, checks, when))


def decide(finding: Finding, config: CollationConfig) -> tuple[Finding, str]:
    """The finding restated with the severity its policy implies, and that policy.

    Checks from other plugins are not in the config: their own severity decides (error stops, else warn).
    """
    action = config.policy_for(finding.code)
    if action is None:
        action = "error" if finding.severity is Severity.ERROR else "warn"
    severity = Severity.ERROR if action == "error" else Severity.WARNING
    if finding.severity is not severity:
        finding = dataclasses.replace(finding, severity=severity)
    return finding, action


def _message(findings: tuple[Finding, ...], rows: list[int], headline: str | None, checks: str, when: str) -> str:
    shown_rows = ", ".join(str(row) for row in rows[:MAX_LISTED_FINDINGS])
    more_rows = f" and {len(rows) - MAX_LISTED_FINDINGS} more" if len(rows) > MAX_LISTED_FINDINGS else ""
    lines = [headline or f"{checks} failed for {len(rows)} row(s){when}: {shown_rows}{more_rows}"]
    lines += [f"  {finding}" for finding in findings[:MAX_LISTED_FINDINGS]]
    if len(findings) > MAX_LISTED_FINDINGS:
        lines.append(f"  ... {len(findings) - MAX_LISTED_FINDINGS} more finding(s)")
    codes = sorted({finding.code for finding in findings})
    lines.append(
        f"Fix the rows, or set collation.policy.<check> ({', '.join(codes)}) to 'skip' to drop such rows "
        "(counted and written to the collation report) or 'warn' to keep them."
    )
    return "\n".join(lines)
