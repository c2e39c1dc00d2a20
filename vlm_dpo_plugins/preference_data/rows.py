"""Reading a preference file row by row: JSONL streamed line by line, a JSON list parsed once.

A JSONL line that is not UTF-8 or not JSON is not an error of the whole file: it becomes a
``BadRow`` that the caller reports as that row (row and line named), like any other row-level
problem, and the lines after it are still read. A ``.json`` file is one JSON value, so an
encoding or syntax error in it can only be an error of the whole file.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.shown import clipped, error_reason, shown, shown_path


@dataclass(frozen=True)
class BadRow:
    """A JSONL line that cannot be a row; stands in the row's place so the numbering goes on."""

    reason: str
    fix: str


@dataclass(frozen=True)
class RawRow:
    index: int
    """0-based, in file order; blank lines do not count."""
    line: int | None
    """JSONL only: the 1-based line an editor shows."""
    value: Any
    """The parsed JSON, or a ``BadRow``."""


def read_rows(path: Path) -> Iterator[RawRow]:
    """The file's rows, lazily; raises ``ConfigError`` for what makes the whole file unreadable."""
    _require_readable_file(path)
    if path.suffix == ".jsonl":
        return _jsonl_rows(path)
    if path.suffix == ".json":
        return _json_rows(path)
    raise ConfigError(
        f"preference data file {shown_path(path)} has an unsupported extension {shown(path.suffix)}. "
        "Fix: use .jsonl (one JSON object per line) or .json (a list of objects)"
    )


def _require_readable_file(path: Path) -> None:
    try:
        status = path.stat()
    except FileNotFoundError:
        status = None
    except (OSError, ValueError) as error:  # a name too long for the filesystem, a NUL, a loop of links
        raise ConfigError(
            f"preference data file {shown_path(path)} cannot be reached ({error_reason(error)}). Fix: pass --data with "
            "the path of a .jsonl or .json file"
        ) from None
    if status is None or not stat.S_ISREG(status.st_mode):
        what = "is a folder, not a file" if status is not None and stat.S_ISDIR(status.st_mode) else "not found"
        raise ConfigError(
            f"preference data file {what}: tried {shown_path(path.absolute())}. Fix: pass --data FILE.jsonl (or .json)"
        )
    if not os.access(path, os.R_OK):
        raise ConfigError(
            f"preference data file {shown_path(path)} cannot be read (permission denied). Fix: make it readable"
        )


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    index = 0
    with open(path, "rb") as file:
        for number, raw_line in enumerate(file, start=1):
            # Decoded per line, so one line in another encoding is one bad row, not an unreadable file.
            try:
                line = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                bad = BadRow(
                    f"the line is not UTF-8 ({error.reason} at byte {error.start})",
                    "re-encode the line as UTF-8, or remove it",
                )
                yield RawRow(index, number, bad)
                index += 1
                continue
            if not line.strip():
                continue
            yield RawRow(index, number, _parsed_line(line))
            index += 1


def _parsed_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        return BadRow(
            f"the line is not valid JSON ({error.msg} at column {error.colno})",
            "make the line one complete JSON object, or remove it",
        )
    except (ValueError, RecursionError) as error:
        return BadRow(f"the line cannot be read as JSON: {_json_limit(error)}", "simplify the line, or remove it")


def _json_limit(error: BaseException) -> str:
    """What a JSON text that is valid but beyond the parser's limits holds (Python refuses it with these errors)."""
    if isinstance(error, RecursionError):
        return f"its values are nested deeper than Python's parser allows ({sys.getrecursionlimit()} levels)"
    return f"it holds an integer too long to convert ({clipped(str(error))})"


def _json_rows(path: Path) -> Iterator[RawRow]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"preference data file {shown_path(path)} is not UTF-8 ({error.reason} at byte {error.start}). "
            "Fix: save it as UTF-8"
        ) from None
    except OSError as error:
        raise ConfigError(f"preference data file {shown_path(path)} cannot be read ({error_reason(error)})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        hint = " If it holds one object per line, name it .jsonl." if error.msg == "Extra data" else ""
        raise ConfigError(
            f"preference data file {shown_path(path)} is not valid JSON: {error.msg} at line {error.lineno}, "
            f"column {error.colno}. Fix: correct the JSON there.{hint}"
        ) from None
    except (ValueError, RecursionError) as error:
        raise ConfigError(
            f"preference data file {shown_path(path)} cannot be read as JSON: {_json_limit(error)}. "
            "Fix: simplify the value"
        ) from None
    if not isinstance(value, list):
        raise ConfigError(
            f"preference data file {shown_path(path)} holds a JSON {json_type(value)}, not a list of rows. "
            "Fix: a .json file must hold [ {row}, {row}, ... ]; for one row per line use .jsonl"
        )
    for index, item in enumerate(value):
        yield RawRow(index, None, item)


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages about what a row or field holds."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")
