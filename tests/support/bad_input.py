"""A corpus of broken preference rows, in LLaMA-Factory's and ms-swift's file formats.

Each defect edits one good row the way real datasets break (a pair copied into both columns,
a role misspelt, an image that is missing, empty, not an image or too large to open) and names
the checks that may report it. ``break_rows`` applies defects to chosen rows of a copy;
``write_jsonl`` writes rows as the JSON-lines file both frameworks read.
"""

from __future__ import annotations

import copy
import json
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Key = tuple[Any, ...]
BAD_INPUT = "bad-input"
"""The row of docs/reliability.md's table these suites fill."""


@dataclass(frozen=True)
class FileFormat:
    """Where the texts and roles of a row live, as key paths into it."""

    prompt: Key
    chosen: Key
    rejected: Key
    prompt_role: Key
    chosen_role: Key


LLAMAFACTORY = FileFormat(
    prompt=("conversations", -1, "value"),
    chosen=("chosen", "value"),
    rejected=("rejected", "value"),
    prompt_role=("conversations", -1, "from"),
    chosen_role=("chosen", "from"),
)
SWIFT = FileFormat(
    prompt=("messages", 0, "content"),
    chosen=("messages", -1, "content"),
    rejected=("rejected_response",),
    prompt_role=("messages", 0, "role"),
    chosen_role=("messages", -1, "role"),
)


def get(row: dict, key: Key) -> Any:
    for part in key:
        row = row[part]
    return row


def put(row: dict, key: Key, value: Any) -> None:
    get(row, key[:-1])[key[-1]] = value


def huge_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header for an image far past Pillow's decompression-bomb limit (the file itself is tiny)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _image_file(content: bytes | None, name: str) -> Callable[[dict, FileFormat, Path], None]:
    def defect(row: dict, fmt: FileFormat, folder: Path) -> None:
        path = folder / name
        if content is not None:
            path.write_bytes(content)
        row["images"] = [str(path)]

    return defect


def _identical(row, fmt, folder):
    put(row, fmt.rejected, get(row, fmt.chosen))


def _whitespace_only(row, fmt, folder):
    put(row, fmt.rejected, get(row, fmt.chosen).replace(" ", "  ", 1) + " ")


def _empty_chosen(row, fmt, folder):
    put(row, fmt.chosen, "")


def _blank_rejected(row, fmt, folder):
    put(row, fmt.rejected, "   ")


def _wrong_prompt_role(row, fmt, folder):
    put(row, fmt.prompt_role, "customer")


def _response_not_assistant(row, fmt, folder):
    put(row, fmt.chosen_role, "user")


def _image_extra(row, fmt, folder):
    row["images"] = row["images"] * 2


def _image_absent(row, fmt, folder):
    row["images"] = []


DEFECTS: dict[str, tuple[Callable[[dict, FileFormat, Path], None], set[str]]] = {
    "identical": (_identical, {"identical-pair"}),
    "whitespace-only": (_whitespace_only, {"near-identical-pair"}),
    "empty-chosen": (_empty_chosen, {"empty-response"}),
    "blank-rejected": (_blank_rejected, {"empty-response"}),
    "wrong-prompt-role": (_wrong_prompt_role, {"malformed-row"}),
    "response-not-assistant": (_response_not_assistant, {"malformed-row"}),
    "image-missing": (_image_file(None, "absent.png"), {"image-unreadable"}),
    "image-zero-byte": (_image_file(b"", "zero.png"), {"image-unreadable"}),
    "image-corrupt": (_image_file(b"this is not a PNG", "corrupt.png"), {"image-unreadable"}),
    "image-huge": (_image_file(huge_png(), "huge.png"), {"image-unreadable"}),
    "image-extra": (_image_extra, {"image-count-mismatch"}),
    "image-absent": (_image_absent, {"image-count-mismatch"}),
}


def break_rows(rows: list[dict], defects: dict[int, str], fmt: FileFormat, folder: Path) -> list[dict]:
    """A copy of ``rows`` with ``defects[row]`` applied to each named row (broken image files go into ``folder``)."""
    rows = copy.deepcopy(rows)
    folder.mkdir(parents=True, exist_ok=True)
    for row, defect in defects.items():
        DEFECTS[defect][0](rows[row], fmt, folder)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def skipped_records(report: Path) -> list[dict]:
    """The ``skip`` records of a collation report (none when the file was never written)."""
    lines = report.read_text().splitlines() if report.exists() else []
    return [record for record in map(json.loads, lines) if record["action"] == "skip"]


def row_account(output: str, framework: str) -> dict[str, int]:
    """The numbers of the one ``vlm-dpo: rows of ...`` line a run logged (asserting there is exactly one)."""
    pattern = re.compile(
        r"vlm-dpo: rows of \S+: (?P<rows_in>\d+) in; (?P<training>\d+) training, (?P<file_checks>\d+) left out "
        r"by the file checks, (?P<prescan>\d+) left out by the collation pre-scan, (?P<dropped>\d+) dropped by "
        + re.escape(framework)
    )
    lines = pattern.findall(output)
    assert len(lines) == 1, f"{len(lines)} row-account lines in the output"
    return {name: int(value) for name, value in pattern.search(output).groupdict().items()}
