"""Config files read once, bounded, into plain values; anything unreadable is a ``ConfigError`` naming file and line.

The plugin config (``read_yaml``) and ``vlm-dpo doctor --config`` read files a user, a launcher
or ``VLM_DPO_CONFIG`` names. What a file can do before its values are even checked is bounded:

- size: at most ``MAX_BYTES``, checked before reading; a config is a few kilobytes, and a bigger
  file is a wrong path (a dataset, a checkpoint), not a config;
- YAML aliases: a document whose aliases expand to more than ``MAX_NODES`` values (a "billion
  laughs" bomb: a few hundred bytes, 10^9 values once walked) or refer to themselves is refused
  while it is still a graph of shared nodes, so nothing ever walks the expansion;
- tags: YAML is read with the safe loader, so ``!!python/object`` is an error, never code;
- text: UTF-8 (a byte-order mark is skipped); another encoding names the byte and line.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.shown import clipped, error_reason, shown_path

MAX_BYTES = 16 * 1024 * 1024
MAX_NODES = 1_000_000
"""Values a YAML document may hold once its aliases are expanded: far above any real config, far below a bomb."""


def read_text(path: Path, what: str, origin: str = "") -> str:
    """The file's text; ``what`` ("config file") and ``origin`` (" (VLM_DPO_CONFIG)") name it in errors."""
    named = f"{what} {shown_path(path)}{origin}"
    try:
        status = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{named} not found (looked for {shown_path(path.absolute())}). Fix: give the path of "
                          "an existing file") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{named} cannot be reached ({error_reason(error)})") from None
    if stat.S_ISDIR(status.st_mode):
        raise ConfigError(f"{named} is a folder. Fix: give the path of the file in it")
    if status.st_size > MAX_BYTES:
        raise ConfigError(
            f"{named} is {status.st_size / 2**20:.0f} MiB; a config file is at most {MAX_BYTES // 2**20} MiB. Fix: "
            "check the path (is it a dataset or a checkpoint?)"
        )
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_BYTES + 1)  # a pipe or a growing file has no size to check beforehand
    except OSError as error:
        raise ConfigError(f"{named} cannot be read ({error_reason(error)})") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{named} holds more than {MAX_BYTES // 2**20} MiB; a config file is far smaller")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            f"{named} is not UTF-8 text: {error.reason} at byte {error.start} (line {line}). Fix: save it as UTF-8"
        ) from None


def parse_yaml(text: str, named: str) -> Any:
    """The YAML document's value; ``named`` ("config file 'x.yaml'") starts every error message."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = clipped(" ".join(part for part in (error.context, error.problem) if part), 200)
        if isinstance(error, yaml.constructor.ConstructorError):
            raise ConfigError(
                f"{named}{where}: {problem}; config files are read as plain YAML (no !!python tags). Fix: write "
                "the value as plain text, numbers, lists and mappings"
            ) from None
        raise ConfigError(f"{named}{where}: not valid YAML: {problem}. Fix: correct the YAML there") from None
    except _Expansion as error:
        raise ConfigError(f"{named}: {error}. Fix: write the values out, or use fewer aliases") from None
    except (yaml.YAMLError, ValueError, RecursionError) as error:
        # ValueError: an integer of more than 4300 digits; RecursionError: values nested thousands deep.
        raise ConfigError(f"{named}: cannot be read as YAML ({error_reason(error)})") from None


def parse_json(text: str, named: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{named}, line {error.lineno}, column {error.colno}: not valid JSON: {error.msg}"
        ) from None
    except (ValueError, RecursionError) as error:
        raise ConfigError(f"{named}: cannot be read as JSON ({error_reason(error)})") from None


def origin_of(path: str | os.PathLike, variable: str) -> str:
    """`` (VARIABLE)`` when the environment variable names this path: the user set it, maybe long ago."""
    value = os.environ.get(variable)
    return f" (named by {variable})" if value and os.fspath(path) == value else ""


class _Expansion(Exception):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing a document whose aliases expand past ``MAX_NODES`` values or into themselves."""

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node)
        return node


def _expanded_size(root: Any) -> int:
    """Values in the document once every alias is expanded, from the node graph (each shared node counted once)."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()
    # Iterative, since a document can nest deeper than Python's recursion limit.
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes and not children_done:
            continue
        children = _children(node)
        if not children_done:
            if key in in_progress:
                raise _Expansion("an alias refers to a value that contains it (a recursive alias)")
            in_progress.add(key)
            stack.append((node, True))
            for child in children:
                if id(child) in in_progress:
                    raise _Expansion("an alias refers to a value that contains it (a recursive alias)")
                if id(child) not in sizes:
                    stack.append((child, False))
            continue
        in_progress.discard(key)
        sizes[key] = 1 + sum(sizes[id(child)] for child in children)
        if sizes[key] > MAX_NODES:
            raise _Expansion(f"its aliases expand to more than {MAX_NODES:,} values")
    return sizes[id(root)]


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []
