"""The built-in collation checks plugin.

Its ``vlm_dpo_collate`` is the default implementation of that hook: it calls the
framework's collator and checks the batch it built, pair by pair, before the
forward pass ever sees it. Pairs that would train at ln 2 (identical responses,
an empty or masked-out response), a prompt cut inside its image tokens (the
"Image features and image tokens do not match" crash) or a missing image are
raised as an error, skipped (counted, reported, re-collated without them) or
warned about, per the ``collation`` config.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.collation.checkers import PairCheckers
from vlm_dpo_plugins.collation.checks import check_example_images, check_pair
from vlm_dpo_plugins.collation.flow import Inspection, inspect, prepare
from vlm_dpo_plugins.collation.policy import PairCheckError
from vlm_dpo_plugins.collation.report import CollationSummary, ReportFile
from vlm_dpo_plugins.collation.settings import CollationConfig
from vlm_dpo_plugins.collation.tokens import TokenFacts, collator_max_length, find_processor
from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.markers import hookimpl
from vlm_dpo_plugins.types import Finding, PluginState, RunContext, TokenizedPair

logger = logging.getLogger("vlm_dpo_plugins.collation")

Collate = Callable[[list[Mapping[str, Any]]], dict[str, Any]]


class PairChecks:
    @hookimpl
    def vlm_dpo_config_sections(self) -> Mapping[str, type]:
        return {"collation": CollationConfig}

    def __init__(self) -> None:
        self.config = CollationConfig()
        self.summary = CollationSummary()
        self.report = ReportFile()
        self.output_dir: str | None = None
        self.next_row = 0
        self.token_facts: TokenFacts | None = None
        self._facts_cache: tuple[int, TokenFacts] | None = None
        self._layout_warned = False

    # -- set-up -----------------------------------------------------------

    def use_token_facts(self, facts: TokenFacts) -> None:
        """Set the tokenizer facts explicitly instead of reading them from the collator's processor."""
        self.token_facts = facts

    @hookimpl
    def vlm_dpo_configure(self, config: VLMDPOConfig) -> None:
        self.config = config.collation

    @hookimpl
    def vlm_dpo_train_begin(self, model: Any, context: RunContext) -> None:
        self.output_dir = context.output_dir

    # -- the checks as hooks ----------------------------------------------

    # tryfirst: the built-in checks' findings come first for a row (its first finding is the one a file check names).
    @hookimpl(tryfirst=True)
    def vlm_dpo_check_example(self, example: Mapping[str, Any], row: int) -> list[Finding]:
        if not self.config.enabled:
            return []
        return check_example_images(example, row, verify=self.config.verify_images)

    @hookimpl(tryfirst=True)
    def vlm_dpo_check_pair(self, pair: TokenizedPair) -> list[Finding]:
        return check_pair(pair) if self.config.enabled else []

    @hookimpl(trylast=True)
    def vlm_dpo_collate(
        self, examples: list[Mapping[str, Any]], collate: Collate, checks: PairCheckers
    ) -> dict[str, Any]:
        if not self.config.enabled or not examples:
            return collate(prepare(examples, range(len(examples)), self.config.row_index_key))
        inspection = self._inspect(examples, collate, self._row_indices(examples), checks)
        self._record(inspection, self.summary, origin="train")
        if inspection.errors:
            first_collate_error = next(iter(inspection.collate_errors.values()), None)
            raise PairCheckError(inspection.errors) from first_collate_error
        batch = inspection.final_batch()
        if batch is None:
            skipped = [found for found, action in inspection.decided if action == "skip"]
            raise PairCheckError(
                skipped,
                headline=f"all {len(examples)} pair(s) of this batch were skipped, so there is no batch to train on "
                "(check the dataset before training with collation.wrapper.scan_dataset, which lists the rows "
                "to drop, or use a larger batch)",
            )
        return batch

    # -- metrics and state -------------------------------------------------

    @hookimpl
    def vlm_dpo_metrics(self, step: int) -> Mapping[str, float]:
        if not self.config.enabled:
            return {}
        return {
            "collation/skipped_rows": float(len(self.summary.skipped_rows)),
            "collation/warned_rows": float(len(self.summary.warned_rows)),
        }

    @hookimpl
    def vlm_dpo_state_dict(self) -> tuple[str, PluginState]:
        return "collation", {
            "next_row": self.next_row,
            "skipped_rows": sorted(self.summary.skipped_rows),
            "warned_rows": sorted(self.summary.warned_rows),
            "rows_checked": self.summary.rows_checked,
        }

    @hookimpl
    def vlm_dpo_load_state_dict(self, states: Mapping[str, PluginState]) -> None:
        state = states.get("collation")
        if not state:
            return
        self.next_row = int(state["next_row"])
        self.summary.skipped_rows = set(state["skipped_rows"])
        self.summary.warned_rows = set(state["warned_rows"])
        self.summary.rows_checked = int(state["rows_checked"])
        self.report.resumed = True  # a resumed run adds to its report instead of starting it again

    # -- the pre-scan ------------------------------------------------------

    def scan(
        self,
        examples: Iterable[Mapping[str, Any]],
        collate: Collate,
        checks: PairCheckers,
        *,
        batch_size: int = 8,
        limit: int | None = None,
        output_dir: str | None = None,
    ) -> CollationSummary:
        """Run every example through the same collation and checks, in batches, without raising or training."""
        if output_dir is not None:
            self.output_dir = output_dir
        summary = CollationSummary(report_path=str(self._report_path()))
        if not self.config.enabled:
            return summary
        source = iter(examples if limit is None else itertools.islice(examples, limit))
        start = 0
        while batch := list(itertools.islice(source, batch_size)):
            key = self.config.row_index_key
            rows = [example.get(key, start + offset) for offset, example in enumerate(batch)]
            self._record(self._inspect(batch, collate, rows, checks), summary, origin="scan")
            start += len(batch)
        return summary

    # -- internals ---------------------------------------------------------

    def _inspect(
        self, examples: Sequence[Mapping[str, Any]], collate: Collate, rows: list[int], checks: PairCheckers
    ) -> Inspection:
        inspection = inspect(
            examples, collate, rows,
            config=self.config,
            facts=self._facts(collate),
            max_length=collator_max_length(collate),
            check_example=checks.example,
            check_pair=checks.pair,
        )
        if inspection.layout_problem and not self._layout_warned:
            self._layout_warned = True
            logger.warning("collation: tokenized-pair checks are off for this collator: %s", inspection.layout_problem)
        return inspection

    def _record(self, inspection: Inspection, summary: CollationSummary, origin: str) -> None:
        summary.add(inspection.decided, len(inspection.examples))
        if inspection.decided:
            path = self._report_path()
            summary.report_path = str(path)
            self.report.write(inspection.decided, path, origin)

    def _report_path(self) -> Path:
        return self.report.resolve(self.config.report_path, self.output_dir)

    def _row_indices(self, examples: Sequence[Mapping[str, Any]]) -> list[int]:
        key = self.config.row_index_key
        rows = [example.get(key, self.next_row + offset) for offset, example in enumerate(examples)]
        self.next_row += len(examples)
        return rows

    def _facts(self, collate: Collate) -> TokenFacts:
        if self.token_facts is not None:
            return self.token_facts
        processor = find_processor(collate)
        if self._facts_cache is None or self._facts_cache[0] != id(processor):
            facts = TokenFacts() if processor is None else TokenFacts.from_processor(processor)
            self._facts_cache = (id(processor), facts)
        return self._facts_cache[1]
