"""The dataset pre-scan before step 0: every training row through the framework's collator and every check.

Errors stop the run before any GPU time is spent, naming every row; rows the policies skip are left out of the
training set, so the sampler never draws them (a batch would otherwise shrink, or be rebuilt, mid-run). On a
resumed run the rows left out are read back from the checkpoint instead of scanned again. A framework hands its
training set over as ``TrainingRows``; one whose dataset is not a ``datasets.Dataset`` (ms-swift encodes rows
lazily) supplies a subclass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from vlm_dpo_plugins.collation.pairs import IMAGE_COUNT_KEY
from vlm_dpo_plugins.collation.policy import decide
from vlm_dpo_plugins.collation.wrapper import keep_rows, record_findings, scan_dataset
from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.errors import VLMDPOError
from vlm_dpo_plugins.types import Finding

logger = logging.getLogger("vlm_dpo_plugins.adapters")


class TrainingRows:
    """A framework's training set as the pre-scan reads it; this one: a ``datasets.Dataset``."""

    def __init__(self, dataset: Any, row_index_key: str | None) -> None:
        self.dataset = dataset
        self.row_index_key = row_index_key
        self.read_findings: list[Finding] = []
        """Findings made while reading the rows, outside the collator's checks (an encoder that raised on a row)."""

    def scannable(self) -> bool:
        from datasets import Dataset

        return isinstance(self.dataset, Dataset)

    def examples(self) -> Iterable[Mapping[str, Any]]:
        return self.dataset

    def row_indices(self) -> list[int] | None:
        """The row of the user's data each position holds, when rows carry it; None: positions are rows."""
        if self.row_index_key is None or self.row_index_key not in self.dataset.column_names:
            return None
        return self.dataset[self.row_index_key]

    def select(self, positions: list[int]) -> Any:
        return self.dataset.select(positions)

    def kept(self, skipped: list[int]) -> Any:
        """The training set without the positions in ``skipped``."""
        return self.select(self.positions_kept(skipped)) if skipped else self.dataset

    def positions_kept(self, skipped: list[int]) -> list[int]:
        dropped = set(skipped)
        return [row for row in range(len(self.dataset)) if row not in dropped]


class RowFactsEncoder:
    """A lazily encoding framework's encoder (ms-swift's), with what the checks need beside each encoded row: the
    raw row's image count (encoded rows keep no image list) and its position in the framework's dataset (so a
    batch's findings name the row the pre-scan names). The framework's collator must read only its own keys."""

    def __init__(self, encode: Any, row_index_key: str | None) -> None:
        self.encode = encode.encode if isinstance(encode, RowFactsEncoder) else encode
        self.row_index_key = row_index_key

    def __call__(self, row: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        facts = {IMAGE_COUNT_KEY: len(row.get("images") or ())}
        if self.row_index_key is not None and self.row_index_key in row:
            row = dict(row)
            facts[self.row_index_key] = row.pop(self.row_index_key)
        return {**self.encode(row, **kwargs), **facts}


class LazilyEncodedRows(TrainingRows):
    """A training set whose rows are encoded when drawn, by an encoder that may reject a row (ms-swift's
    ``LazyLLMDataset``, which then silently draws another row instead). The pre-scan encodes every row once; a row
    the encoder rejects is a finding, left out like the others. The set is rebuilt even when nothing was left out:
    its rows then carry their position into every batch, so a batch's findings name the row the pre-scan named.

    A framework says where its raw rows and encoder are (``raw_rows``, ``encoder``), how its dataset is rebuilt
    around rows and an encoder (``rebuilt``) and what an encoder's error means (``rejection``).
    """

    encode_kwargs: Mapping[str, Any] = {}

    def raw_rows(self) -> Any:
        raise NotImplementedError

    def encoder(self) -> Any:
        raise NotImplementedError

    def rebuilt(self, rows: Any, encode: RowFactsEncoder) -> Any:
        raise NotImplementedError

    def rejection(self, row: dict[str, Any], position: int, error: Exception) -> Finding:
        raise NotImplementedError

    def examples(self) -> Iterable[Mapping[str, Any]]:
        raw = self.raw_rows()
        encode = RowFactsEncoder(self.encoder(), self.row_index_key)
        for position in range(len(raw)):
            row = raw[position]
            try:
                encoded = encode(row, **self.encode_kwargs)
            except Exception as error:
                self.read_findings.append(self.rejection(row, position, error))
                continue
            yield {**encoded, self.row_index_key: position}

    def row_indices(self) -> list[int] | None:
        return None

    def kept(self, skipped: list[int]) -> Any:
        return self.select(self.positions_kept(skipped))

    def select(self, positions: list[int]) -> Any:
        rows = self.raw_rows().select(positions)
        key = self.row_index_key
        if key is not None:
            # A column of this name in the user's rows (should the framework keep one) is replaced by the
            # positions the pre-scan named rows by, rather than add_column failing.
            if key in rows.column_names:
                rows = rows.remove_columns(key)
            rows = rows.add_column(key, positions)
        return self.rebuilt(rows, RowFactsEncoder(self.encoder(), key))


def prescan(
    plugins: Any,
    config: VLMDPOConfig,
    rows: TrainingRows,
    collate: Any,
    *,
    batch_size: int,
    output_dir: str,
    skipped: list[int] | None,
) -> tuple[Any, list[int] | None]:
    """The training set without the rows the checks leave out, and those rows (None: no pre-scan ran).

    ``skipped``: the rows a resumed run's checkpoint says were left out; they are not scanned again.
    """
    collation = config.section("collation")
    if collation is None or not (collation.enabled and collation.prescan) or not rows.scannable():
        return rows.dataset, None
    total = len(rows.dataset)
    if skipped is None:
        summary = scan_dataset(plugins, rows.examples(), collate, batch_size=batch_size, output_dir=output_dir)
        record_findings(plugins, [decide(finding, collation) for finding in rows.read_findings], summary, "scan")
        summary.raise_for_errors()
        skipped = sorted(set(range(total)) - set(keep_rows(total, summary, rows.row_indices())))
        if skipped:
            logger.warning(
                "vlm-dpo: %d of %d rows left out before training by the collation checks (listed in %s)",
                len(skipped),
                total,
                summary.report_path,
            )
    if len(skipped) == total > 0:
        raise VLMDPOError(
            f"the collation checks left out every one of the {len(skipped)} training rows (listed in "
            f"{collation.report_path or 'collation_report.jsonl in the output folder'}): "
            "nothing is left to train on; fix the data, or set collation.policy for the checks named there"
        )
    return rows.kept(skipped), skipped
