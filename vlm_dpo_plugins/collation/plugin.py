"""Built-in pair checks on tokenized pairs.

A pair whose chosen and rejected responses tokenize identically, or whose response
mask is empty on one side, has a DPO margin of exactly zero: the loss sits at
ln 2 = 0.6931 and nothing trains. These are errors, reported with the row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vlm_dpo_plugins.collation.settings import CollationConfig
from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.markers import hookimpl
from vlm_dpo_plugins.types import Finding, Severity


def response_tokens(ids: Sequence[int], mask: Sequence[int]) -> list[int]:
    return [token for token, keep in zip(ids, mask) if keep]


class PairChecks:
    def __init__(self) -> None:
        self.config = CollationConfig()

    @hookimpl
    def vlm_dpo_configure(self, config: VLMDPOConfig) -> None:
        self.config = config.collation

    @hookimpl(trylast=True)
    def vlm_dpo_collate(
        self, examples: list[Mapping[str, Any]], collate: Callable[[list[Mapping[str, Any]]], dict[str, Any]]
    ) -> dict[str, Any]:
        # The framework's collator is the default; plugins change its output with wrapper implementations.
        return collate(examples)

    @hookimpl
    def vlm_dpo_check_pair(
        self,
        chosen_ids: Sequence[int],
        chosen_mask: Sequence[int],
        rejected_ids: Sequence[int],
        rejected_mask: Sequence[int],
        row: int,
        special: Mapping[str, Any],
    ) -> list[Finding]:
        if not self.config.check_pairs:
            return []
        findings = []
        chosen = response_tokens(chosen_ids, chosen_mask)
        rejected = response_tokens(rejected_ids, rejected_mask)
        for side, tokens in (("chosen", chosen), ("rejected", rejected)):
            if len(tokens) < self.config.min_response_tokens:
                findings.append(
                    Finding(
                        code="empty-response",
                        severity=Severity.ERROR,
                        message=f"the {side} response has {len(tokens)} trainable tokens after masking/truncation",
                        fix="check the label mask and max_length; the response must not be cut off or masked",
                        row=row,
                        field=side,
                        source="collation",
                    )
                )
        if chosen and chosen == rejected:
            findings.append(
                Finding(
                    code="identical-pair",
                    severity=Severity.ERROR,
                    message="chosen and rejected responses are token-identical, so the DPO margin is 0 (loss ln 2)",
                    fix="remove the row or correct its rejected response",
                    row=row,
                    field="rejected",
                    source="collation",
                )
            )
        return findings
