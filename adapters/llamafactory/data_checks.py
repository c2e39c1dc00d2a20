"""LLaMA-Factory's training files checked before it reads them, and only the rows kept handed to it.

A broken row stops the run before LLaMA-Factory's loader crashes on it or drops it; skipped rows are selected
away before its converter (which raises on a role it has no tag for). Files the checks cannot read as
LLaMA-Factory does are left to the live checks, with a notice (docs/collation.md).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.activation import patched

from vlm_dpo_plugins.collation.file_checks import CheckedFiles, FileChecks
from vlm_dpo_plugins.collation.report import ReportFile
from vlm_dpo_plugins.collation.settings import CollationConfig
from vlm_dpo_plugins.preference_data.pairs import why_llamafactory_columns_are_unread

FRAMEWORK = "LLaMA-Factory"


@contextlib.contextmanager
def checked_loading(
    config: CollationConfig, data_args: Any, training_args: Any, report: ReportFile
) -> Iterator[CheckedFiles]:
    """While LLaMA-Factory loads its datasets, each file is checked first and loaded without its skipped rows."""
    from llamafactory.data import loader

    checks = FileChecks(FRAMEWORK, config, report, training_args.output_dir)
    if not checks.enabled:
        yield checks.files
        return
    stock_load, stock_align = loader._load_single_dataset, loader.align_dataset
    # One training file, in file order, not split: the training set's rows are that file's kept rows.
    rows_known = len(data_args.dataset or []) == 1 and not data_args.val_size

    @functools.wraps(stock_load)
    def load_single_dataset(dataset_attr: Any, model_args: Any, data_args: Any, training_args: Any) -> Any:
        path = (
            _checkable_file(dataset_attr, data_args) if dataset_attr.dataset_name not in checks.files.checks else None
        )
        if path is not None:
            images_root = Path(data_args.media_dir or data_args.dataset_dir)
            check = checks.check(
                dataset_attr.dataset_name, path, images_root=images_root, row_limit=data_args.max_samples
            )
            if rows_known and checks.files.file_rows is None:  # the training file is loaded first
                checks.files.file_rows = check.kept
                checks.account_for_every_row()
        return stock_load(dataset_attr, model_args, data_args, training_args)

    @functools.wraps(stock_align)
    def align_dataset(dataset: Any, dataset_attr: Any, *args: Any, **kwargs: Any) -> Any:
        # Before LLaMA-Factory's converter: it raises on some malformed rows (a role it has no tag for).
        return stock_align(checks.kept(dataset, dataset_attr.dataset_name), dataset_attr, *args, **kwargs)

    with patched(loader, _load_single_dataset=load_single_dataset, align_dataset=align_dataset):
        yield checks.files


def _checkable_file(dataset_attr: Any, data_args: Any) -> Path | None:
    """The local JSON/JSONL file of a dataset entry the checks read as LLaMA-Factory would, else None (noticed)."""
    if dataset_attr.load_from != "file":
        return None
    reason = why_llamafactory_columns_are_unread(dataset_attr.formatting, vars(dataset_attr))
    if dataset_attr.num_samples is not None or data_args.streaming:
        reason = "num_samples or streaming draws its rows out of file order"
    name = dataset_attr.dataset_name
    return FileChecks.checkable(name, Path(data_args.dataset_dir) / name, reason)
