"""ms-swift's ``--dataset`` files checked before it reads them, and only the rows kept handed to it.

A broken row stops the run before swift's preprocessing deletes it or its encoder swaps it for another random
row. Hub datasets, folders and sampled entries (``path#N``) are left to the live checks, with a notice.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.adapters.hf_trainer.activation import patched

from vlm_dpo_plugins.collation.file_checks import CheckedFiles, FileChecks
from vlm_dpo_plugins.collation.settings import CollationConfig
from vlm_dpo_plugins.collation.wrapper import collation_report

FRAMEWORK = "ms-swift"


@contextlib.contextmanager
def checked_loading(args: Any, plugins: Any, config: CollationConfig) -> Iterator[CheckedFiles]:
    """While swift reads its ``--dataset`` files, each is checked first and read without its skipped rows."""
    from swift.dataset import loader

    checks = FileChecks(FRAMEWORK, config, collation_report(plugins), args.output_dir)
    if not checks.enabled:
        yield checks.files
        return
    entries = [_checkable_file(entry) for entry in args.dataset]
    for path in filter(None, entries):
        checks.check(str(path), path)
    streaming = bool(getattr(args, "streaming", False))
    if all(entries) and not streaming and not getattr(args, "split_dataset_ratio", 0) and not args.val_dataset:
        checks.account_for_every_row()  # every row of the training set comes from these files, none split off
    stock = loader.hf_load_dataset

    @functools.wraps(stock)
    def hf_load_dataset(*positional: Any, data_files: Any = None, **kwargs: Any) -> Any:
        dataset = stock(*positional, data_files=data_files, **kwargs)
        if not isinstance(data_files, str) or streaming:
            return dataset
        return checks.kept(dataset, str(Path(data_files).resolve()))

    with patched(loader, hf_load_dataset=hf_load_dataset):
        yield checks.files


def _checkable_file(entry: str) -> Path | None:
    from swift.dataset.dataset_syntax import DatasetSyntax

    syntax = DatasetSyntax.parse(entry)
    sampled = "'#N' draws its rows out of file order" if syntax.dataset_sample is not None else None
    path = FileChecks.checkable(entry, Path(syntax.dataset), sampled)
    return path.resolve() if path is not None else None
