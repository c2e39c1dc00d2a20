"""Reading a preference file row by row: JSONL streamed line by line, a JSON list parsed once.

A line that is not JSON is not an error of the whole file: it becomes a ``BadRow`` that the
report names (row, line, why), like every other row-level problem.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.errors import ConfigError


@dataclass(frozen=True)
class BadRow:
    reason: str


@dataclass(frozen=True)
class RawRow:
    index: int
    line: int | None
    value: Any  # the parsed JSON, or a BadRow


def read_rows(path: Path) -> Iterator[RawRow]:
    if not path.is_file():
        raise ConfigError(f"data file not found: {path.absolute()}. Fix: pass --data FILE.jsonl (or .json)")
    if path.suffix == ".jsonl":
        return _jsonl_rows(path)
    if path.suffix == ".json":
        return _json_rows(path)
    raise ConfigError(f"data file {path} has the extension '{path.suffix}'; expected .jsonl or .json")


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    index = 0
    with open(path, "rb") as file:
        for number, raw_line in enumerate(file, start=1):
            try:
                line = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield RawRow(index, number, BadRow(f"the line is not UTF-8 ({error.reason} at byte {error.start})"))
                index += 1
                continue
            if not line.strip():
                continue
            try:
                value: Any = json.loads(line)
            except json.JSONDecodeError as error:
                value = BadRow(f"the line is not valid JSON ({error.msg} at column {error.colno})")
            yield RawRow(index, number, value)
            index += 1


def _json_rows(path: Path) -> Iterator[RawRow]:
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        hint = " If it holds one object per line, name it .jsonl." if "Extra data" in str(error) else ""
        raise ConfigError(f"data file {path} is not valid UTF-8 JSON: {error}.{hint}") from None
    if not isinstance(value, list):
        raise ConfigError(f"data file {path} holds a JSON {type(value).__name__}, not a list of rows")
    for index, item in enumerate(value):
        yield RawRow(index, None, item)
