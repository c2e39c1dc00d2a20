"""``vlm-dpo doctor --data``: the shared row checks over a whole file, plus truncation measured with a model.

The rows and images are checked by ``preference_data.scan`` exactly as the adapters' file checks
check them; what only the doctor does is measure lengths with the model's own tokenizer and
processor, in batches, when ``--model`` and a max length are given.
"""

from __future__ import annotations

from pathlib import Path

from vlm_dpo_plugins.preference_data.scan import DataReport, Progress, scan_file
from vlm_dpo_plugins.types import Finding

LENGTH_BATCH = 512


def check_data(
    path: Path,
    *,
    images_root: Path | None = None,
    model: str | None = None,
    max_length: int | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> DataReport:
    lengths = None
    if model is not None:
        from vlm_dpo_plugins.doctor.lengths import Lengths

        lengths = Lengths(model)  # loaded first: a wrong --model fails before a long scan
    measure = lengths is not None and max_length is not None
    report = scan_file(path, images_root=images_root, workers=workers, progress=progress, keep_pairs=measure)
    if measure:
        report.findings += _length_findings(report, lengths, max_length)
        report.findings.sort(key=lambda f: (f.row if f.row is not None else -1, f.code))
    return report


def _length_findings(report: DataReport, lengths, max_length: int) -> list[Finding]:
    from vlm_dpo_plugins.doctor.lengths import truncation_findings

    findings = []
    pairs = report.pairs
    for start in range(0, len(pairs), LENGTH_BATCH):
        batch = pairs[start : start + LENGTH_BATCH]
        image_tokens = [lengths.image_tokens(report.image_sizes.get(pair.row, [])) for pair in batch]
        for pair, measured in zip(batch, lengths.measure(batch, image_tokens)):
            findings += truncation_findings(pair, measured, max_length)
    return findings
