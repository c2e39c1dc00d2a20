"""Load a preference data file into the dataset TRL's vision DPO expects, or say exactly what is wrong with it.

The result has TRL's conversational vision-preference columns (``images``,
``prompt``, ``chosen``, ``rejected``; the shape ``tiny.data.trl_conversational_rows``
builds) plus ``row_index``, the row's position in the file, which the collation
checks use to name rows. Images are stored as paths and decoded only when a batch
is collated, but every one is opened once here, so a wrong path fails before the
model is loaded rather than hours into a run. The file is read and the images are
checked by ``preference_data`` exactly as ``vlm-dpo doctor`` and the other adapters'
file checks do: a line that is not UTF-8 or not JSON is one bad row. See docs/data-format.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.preference_data.images import ImageTarget, check_images, locate
from vlm_dpo_plugins.preference_data.rows import BadRow, json_type, read_rows
from vlm_dpo_plugins.shown import shown

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant", "tool")
PART_TYPES = ("text", "image")
MESSAGE_FIELDS = (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant"))
MAX_LISTED_PROBLEMS = 20

_PART = {"type": datasets.Value("string"), "text": datasets.Value("string")}
_MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.List(_PART)})
FEATURES = datasets.Features(
    {
        "images": datasets.List(datasets.Image()),  # paths in Arrow; PIL images once a row is read
        "prompt": _MESSAGES,
        "chosen": _MESSAGES,
        "rejected": _MESSAGES,
        "row_index": datasets.Value("int64"),
    }
)


@dataclass(frozen=True)
class Problem:
    row: int
    line: int | None  # JSONL only: the 1-based line an editor shows
    field: str | None
    message: str
    fix: str

    def describe(self) -> str:
        where = f"row {self.row}" + (f" (line {self.line})" if self.line is not None else "")
        if self.field is not None:
            where += f", field '{self.field}'"
        return f"{where}: {self.message}. Fix: {self.fix}"


@dataclass
class RowReport:
    """Where one row came from, and the problems found in it."""

    row: int
    line: int | None
    problems: list[Problem]

    def add(self, field: str | None, message: str, fix: str) -> None:
        self.problems.append(Problem(self.row, self.line, field, message, fix))


@dataclass(frozen=True)
class ImageUse:
    row: int
    line: int | None
    field: str
    target: ImageTarget

    @property
    def column_value(self) -> str:
        """What the ``images`` column holds: the resolved path, or the URL datasets fetches when it decodes."""
        return str(self.target.path) if self.target.path is not None else self.target.url


def load_preference_dataset(
    path: str | os.PathLike, *, images_root: str | os.PathLike | None = None
) -> datasets.Dataset:
    """Read ``path`` (``.jsonl`` or ``.json``) into a ``datasets.Dataset`` for ``trl.DPOTrainer``.

    Relative image paths are resolved against ``images_root``, or against the data
    file's folder when it is None. Every problem found (up to 20 listed) is raised
    at once as one ``ConfigError`` naming the file, row, line, field and fix.
    """
    data_path = Path(path)
    root = Path(images_root) if images_root is not None else data_path.parent
    root_description = f"--images-root {root}" if images_root is not None else f"the data file's folder {root}"

    problems: list[Problem] = []
    columns: dict[str, list] = {name: [] for name in FEATURES}
    image_uses: list[ImageUse] = []
    rows = 0
    for raw in read_rows(data_path):
        rows += 1
        report = RowReport(raw.index, raw.line, problems)
        parsed = parse_row(raw.value, report, lambda written: locate(written, (root,)))
        if parsed is None:
            continue
        uses, fields = parsed
        image_uses.extend(uses)
        for name, value in fields.items():
            columns[name].append(value)
        columns["images"].append([use.column_value for use in uses])
        columns["row_index"].append(raw.index)
    if not rows:
        raise ConfigError(f"preference data file {data_path} holds no rows. Fix: add at least one preference pair")

    problems.extend(image_problems(image_uses, root_description))
    if problems:
        raise ConfigError(summarise(data_path, problems))
    return datasets.Dataset.from_dict(columns, features=FEATURES)


# ---------------------------------------------------------------- one row


def parse_row(raw: Any, report: RowReport, locate_image: Callable[[str], ImageTarget]):
    """The row's message columns and image uses, or None after reporting why the row is unusable."""
    if isinstance(raw, BadRow):
        report.add(None, raw.reason, raw.fix)
        return None
    if not isinstance(raw, dict):
        report.add(
            None,
            f"is a JSON {json_type(raw)}, not an object",
            'each row must be an object with "prompt", "chosen", "rejected" and "images"',
        )
        return None

    image_field, written_paths = image_paths(raw, report)
    fields = {}
    for name, default_role in MESSAGE_FIELDS:
        messages = message_list(raw, name, default_role, report)
        if messages is not None:
            fields[name] = messages
    if written_paths is None or len(fields) < len(MESSAGE_FIELDS):
        return None

    place_images_without_placeholders(fields["prompt"], len(written_paths))
    if not check_image_parts(fields, image_field, len(written_paths), report):
        return None
    uses = [
        ImageUse(report.row, report.line, image_field_name(image_field, index), locate_image(written))
        for index, written in enumerate(written_paths)
    ]
    return uses, {name: [strip_source(message) for message in messages] for name, messages in fields.items()}


def image_field_name(image_field: str, index: int) -> str:
    return f"images[{index}]" if image_field == "images" else "image"


def image_paths(raw: dict, report: RowReport) -> tuple[str, list[str] | None]:
    """Which field holds the images (``images`` or ``image``) and the paths as written."""
    if "images" in raw and "image" in raw:
        report.add("image", 'the row has both "images" and "image"', 'keep one: "images": [path, ...]')
        return "images", None
    if "image" in raw:
        value = raw["image"]
        if not isinstance(value, str) or not value:
            report.add("image", f"is {describe_value(value)}, expected an image path", 'write "image": "path.png"')
            return "image", None
        return "image", [value]
    if "images" not in raw:
        report.add(
            "images",
            "is missing",
            'add "images": ["path.png", ...] (or "image": "path.png"; "images": [] for a text-only row)',
        )
        return "images", None
    value = raw["images"]
    if not isinstance(value, list):
        report.add("images", f"is {describe_value(value)}, expected a list of image paths", 'write "images": [...]')
        return "images", None
    valid = True
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item:
            report.add(f"images[{index}]", f"is {describe_value(item)}, expected an image path", "give a file path")
            valid = False
    return "images", value if valid else None


def message_list(raw: dict, name: str, default_role: str, report: RowReport) -> list[dict] | None:
    """The field as messages with typed-part contents; a plain string becomes one ``default_role`` message."""
    if name not in raw:
        report.add(name, "is missing", f'add "{name}": a string, or a list of {{"role", "content"}} messages')
        return None
    value = raw[name]
    if isinstance(value, str):
        value = [{"role": default_role, "content": value}]
    elif not isinstance(value, list):
        report.add(
            name,
            f"is {describe_value(value)}, expected a string or a list of messages",
            f'write "{name}": "<text>", or a list of {{"role", "content"}} messages',
        )
        return None
    messages = []
    for index, message in enumerate(value):
        parsed = parse_message(message, f"{name}[{index}]", report)
        if parsed is None:
            return None
        messages.append(parsed)
    return messages


def parse_message(message: Any, field: str, report: RowReport) -> dict | None:
    if not isinstance(message, dict):
        report.add(
            field, f"is {describe_value(message)}, expected a message object", 'use {"role": ..., "content": ...}'
        )
        return None
    role = message.get("role")
    if role not in ROLES:
        fix = f"use one of {', '.join(ROLES)}"
        report.add(f"{field}.role", f"is {describe_value(role)}, not a known role", fix)
        return None
    content = message.get("content")
    if isinstance(content, str):
        return {"role": role, "content": parts_from_text(content), "_was_text": True}
    if not isinstance(content, list):
        report.add(
            f"{field}.content",
            f"is {describe_value(content)}, expected a string or a list of typed parts",
            'use a string, or [{"type": "image"}, {"type": "text", "text": ...}]',
        )
        return None
    parts = []
    for index, part in enumerate(content):
        parsed = parse_part(part, f"{field}.content[{index}]", report)
        if parsed is None:
            return None
        parts.append(parsed)
    return {"role": role, "content": parts, "_was_text": False}


def parse_part(part: Any, field: str, report: RowReport) -> dict | None:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
        seen = describe_value(part.get("type") if isinstance(part, dict) else part)
        report.add(field, f"has type {seen}", 'use {"type": "text", "text": ...} or {"type": "image"}')
        return None
    if part["type"] == "image":
        return {"type": "image", "text": None}
    text = part.get("text")
    if not isinstance(text, str):
        report.add(f"{field}.text", f"is {describe_value(text)}, expected a string", "give the part's text")
        return None
    return {"type": "text", "text": text}


def parts_from_text(text: str) -> list[dict]:
    """Each ``<image>`` becomes an image part where it stands; the newline that conventionally
    separates a placeholder from the text goes (chat templates add their own separator)."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts = []
    for index, piece in enumerate(pieces):
        if index > 0:
            parts.append({"type": "image", "text": None})
            piece = piece.lstrip("\n")
        if index < len(pieces) - 1:
            piece = piece.rstrip("\n")
        if piece.strip() or len(pieces) == 1:
            parts.append({"type": "text", "text": piece})
    return parts


def place_images_without_placeholders(prompt: list[dict], image_count: int) -> None:
    """With no image part anywhere, images go before the first user message's text (TRL's own rule)
    when that message was plain text; typed-part contents must place their images themselves."""
    if image_count == 0 or count_image_parts(prompt) > 0:
        return
    first_user = next((message for message in prompt if message["role"] == "user"), None)
    if first_user is not None and first_user["_was_text"]:
        first_user["content"][:0] = [{"type": "image", "text": None} for _ in range(image_count)]


def check_image_parts(fields: dict[str, list[dict]], image_field: str, image_count: int, report: RowReport) -> bool:
    ok = True
    for name in ("chosen", "rejected"):
        if count_image_parts(fields[name]):
            report.add(name, "contains an image part", "images belong in the prompt; remove it from the response")
            ok = False
    placed = count_image_parts(fields["prompt"])
    if placed != image_count:
        report.add(
            "prompt",
            f'has {placed} image placeholder(s) ({IMAGE_PLACEHOLDER} or {{"type": "image"}}) '
            f"but '{image_field}' lists {image_count} image(s)",
            f"make them equal: one {IMAGE_PLACEHOLDER} (or image part) per image, in order",
        )
        ok = False
    return ok


def count_image_parts(messages: list[dict]) -> int:
    return sum(1 for message in messages for part in message["content"] if part["type"] == "image")


def strip_source(message: dict) -> dict:
    return {"role": message["role"], "content": message["content"]}


# ---------------------------------------------------------------- images


def image_problems(uses: list[ImageUse], root_description: str) -> list[Problem]:
    """Every distinct image opened once (``preference_data.images``, the check doctor runs)."""
    results = check_images({use.target.key: use.target for use in uses})
    return [
        Problem(
            use.row,
            use.line,
            use.field,
            results[use.target.key].problem,
            f"correct the path (relative paths resolve against {root_description}; --images-root DIR sets "
            "that folder) or replace the file with a readable image (PNG, JPEG, ...), or drop the row",
        )
        for use in uses
        if results[use.target.key].problem
    ]


# ---------------------------------------------------------------- messages


def summarise(path: Path, problems: list[Problem]) -> str:
    ordered = sorted(problems, key=lambda problem: problem.row)
    lines = [f"{len(problems)} problem(s) in preference data file {path}:"]
    lines += [f"  - {problem.describe()}" for problem in ordered[:MAX_LISTED_PROBLEMS]]
    if len(ordered) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(ordered) - MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)


def describe_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {shown(value)}" if value else "an empty string"
    return f"a JSON {json_type(value)}"
