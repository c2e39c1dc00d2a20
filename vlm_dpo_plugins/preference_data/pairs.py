"""One raw row in any of the three frameworks' preference layouts, as a neutral pair of texts and images.

Layouts, detected per row by their keys:

- ``trl``: ``prompt``, ``chosen``, ``rejected`` as strings or conversational messages
  (content strings or typed parts ``{"type": "image"}``/``{"type": "text"}``), ``images``/``image``;
- ``sharegpt`` (LLaMA-Factory pairwise): ``conversations`` (``from``/``value``) or ``messages``
  (``role``/``content``), ``chosen``/``rejected`` as a message or a string, ``images``;
- ``alpaca`` (LLaMA-Factory pairwise): ``instruction`` (+ ``input``), ``chosen``/``rejected`` strings, ``images``;
- ``swift`` (ms-swift): ``messages`` ending with the chosen assistant turn, ``rejected_response``, ``images``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vlm_dpo_plugins.preference_data.rows import json_type
from vlm_dpo_plugins.shown import shown
from vlm_dpo_plugins.types import Finding, Severity

IMAGE_PLACEHOLDER = "<image>"
USER_ROLES = ("user", "human")
ASSISTANT_ROLES = ("assistant", "gpt")
MALFORMED = "malformed-row"
ROW_FIX = (
    "write one JSON object per row (a .jsonl file holds one object per line; a file that is one JSON array of "
    "rows must be named .json)"
)
LLAMAFACTORY_READ = {
    "sharegpt": {
        "messages": ("conversations", "messages"),
        "chosen": ("chosen",),
        "rejected": ("rejected",),
        "images": (None, "images"),
        "role_tag": ("from", "role"),
        "content_tag": ("value", "content"),
        "user_tag": USER_ROLES,
        "assistant_tag": ASSISTANT_ROLES,
    },
    "alpaca": {
        "prompt": ("instruction",),
        "query": (None, "input"),
        "chosen": ("chosen",),
        "rejected": ("rejected",),
        "images": (None, "images"),
    },
}
"""LLaMA-Factory's ``dataset_info.json`` column and tag names this reader reads, per ``formatting``."""


def why_llamafactory_columns_are_unread(formatting: str, columns: Mapping[str, Any]) -> str | None:
    """None when this reader reads a LLaMA-Factory dataset entry with these ``columns`` (its ``DatasetAttr``
    fields) as LLaMA-Factory does; otherwise why not."""
    read = LLAMAFACTORY_READ.get(formatting)
    if read is None:
        return f"its formatting is {formatting!r}"
    if any(columns.get(name) not in accepted for name, accepted in read.items()):
        return "its columns or role names are its own"
    return None


@dataclass
class Pair:
    row: int
    layout: str
    prompt: str
    chosen: str
    rejected: str
    images: list[Any] = field(default_factory=list)
    placeholders: int = 0
    """Image markers written in the prompt (``<image>`` or typed image parts)."""
    needs_placeholders: bool = False
    """The framework rejects images without a marker (LLaMA-Factory); the others place them first."""


class RowProblem(Exception):
    def __init__(self, field_name: str | None, message: str, fix: str) -> None:
        super().__init__(message)
        self.field_name, self.message, self.fix = field_name, message, fix


def malformed(row: int, problem: RowProblem) -> Finding:
    return Finding(
        MALFORMED, Severity.ERROR, problem.message, problem.fix, row=row, field=problem.field_name, source="doctor"
    )


def parse_pair(row: int, value: Any) -> Pair:
    """The neutral pair; raises ``RowProblem`` naming the field when the row cannot be read."""
    if not isinstance(value, Mapping):
        raise RowProblem(None, f"the row is a JSON {json_type(value)} ({shown(value, 40)}), not an object", ROW_FIX)
    if "conversations" in value or ("messages" in value and "rejected_response" not in value):
        pair = _sharegpt(value)
    elif "messages" in value:
        pair = _swift(value)
    elif "instruction" in value:
        pair = _alpaca(value)
    elif "prompt" in value:
        pair = _trl(value)
    else:
        raise RowProblem(
            None,
            f"no known preference layout: keys {shown(list(value))}",
            "use prompt/chosen/rejected (TRL), conversations+chosen+rejected or instruction+chosen+rejected "
            "(LLaMA-Factory), or messages+rejected_response (ms-swift)",
        )
    pair.row = row
    pair.images = _images(value)
    return pair


def _trl(value: Mapping[str, Any]) -> Pair:
    prompt_text, markers = _prompt(value["prompt"], "prompt")
    chosen = _response(_required(value, "chosen"), "chosen")
    rejected = _response(_required(value, "rejected"), "rejected")
    return Pair(0, "trl", prompt_text, chosen, rejected, placeholders=markers)


def _sharegpt(value: Mapping[str, Any]) -> Pair:
    key = "conversations" if "conversations" in value else "messages"
    prompt_text, markers = _prompt(value[key], key)
    chosen = _response(_required(value, "chosen"), "chosen")
    rejected = _response(_required(value, "rejected"), "rejected")
    return Pair(0, "sharegpt", prompt_text, chosen, rejected, placeholders=markers, needs_placeholders=True)


def _alpaca(value: Mapping[str, Any]) -> Pair:
    parts = [_string(value.get("instruction"), "instruction"), _string(value.get("input") or "", "input")]
    prompt_text = "\n".join(part for part in parts if part)
    chosen = _string(_required(value, "chosen"), "chosen")
    rejected = _string(_required(value, "rejected"), "rejected")
    return Pair(
        0,
        "alpaca",
        prompt_text,
        chosen,
        rejected,
        placeholders=prompt_text.count(IMAGE_PLACEHOLDER),
        needs_placeholders=True,
    )


def _swift(value: Mapping[str, Any]) -> Pair:
    messages = value["messages"]
    if not isinstance(messages, list) or not messages:
        raise RowProblem("messages", "'messages' is empty or not a list", "give the prompt turns and the chosen answer")
    *prompt_turns, last = messages
    if _role(last, f"messages[{len(messages) - 1}]") not in ASSISTANT_ROLES:
        raise RowProblem(
            f"messages[{len(messages) - 1}]",
            f"the last message has role {last.get('role')!r}; ms-swift takes the last assistant turn as the chosen "
            "response",
            "end 'messages' with the chosen answer as an assistant turn",
        )
    prompt_text, markers = _prompt(prompt_turns, "messages")
    chosen = _text(last.get("content"), f"messages[{len(messages) - 1}].content")[0]
    rejected = _string(value["rejected_response"], "rejected_response")
    return Pair(0, "swift", prompt_text, chosen, rejected, placeholders=markers)


def _prompt(value: Any, name: str) -> tuple[str, int]:
    if isinstance(value, str):
        return value, value.count(IMAGE_PLACEHOLDER)
    if not isinstance(value, list) or not value:
        raise RowProblem(
            name,
            f"'{name}' is {_shown(value)}; expected a string or a list of messages",
            "give the prompt text or its messages",
        )
    texts, markers = [], 0
    for index, message in enumerate(value):
        where = f"{name}[{index}]"
        _role(message, where)
        text, parts = _text(message.get("content", message.get("value")), f"{where}.content")
        texts.append(text)
        markers += parts
    last_role = _role(value[-1], f"{name}[{len(value) - 1}]")
    if last_role not in USER_ROLES:
        raise RowProblem(
            f"{name}[{len(value) - 1}]",
            f"the prompt ends with a {last_role!r} turn; the response must answer a user turn",
            "end the prompt with the user's turn (role 'user' / from 'human')",
        )
    return "\n".join(texts), markers


def _response(value: Any, name: str) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise RowProblem(
                name,
                f"'{name}' holds {len(value)} messages; expected the one assistant answer",
                "give one assistant message",
            )
        value = value[0]
    if isinstance(value, Mapping):
        role = _role(value, name)
        if role not in ASSISTANT_ROLES:
            raise RowProblem(
                name,
                f"'{name}' has role {role!r}; a response must be an assistant turn",
                "set its role to 'assistant' (from 'gpt')",
            )
        return _text(value.get("content", value.get("value")), f"{name}.content")[0]
    return _string(value, name)


def _role(message: Any, where: str) -> str:
    if not isinstance(message, Mapping):
        raise RowProblem(where, f"'{where}' is {_shown(message)}; expected a message object", "use {role, content}")
    role = message.get("role", message.get("from"))
    if not isinstance(role, str):
        raise RowProblem(where, f"'{where}' has no role ('role' or 'from')", "give each message its role")
    return role


def _text(content: Any, where: str) -> tuple[str, int]:
    """The text of a message content and its image markers."""
    if isinstance(content, str):
        return content, content.count(IMAGE_PLACEHOLDER)
    if isinstance(content, list):
        texts, markers = [], 0
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "image":
                markers += 1
            elif kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
                markers += part["text"].count(IMAGE_PLACEHOLDER)
            else:
                raise RowProblem(
                    f"{where}[{index}]",
                    f"content part {_shown(part)} is neither an image nor a text part",
                    "use {'type': 'image'} or {'type': 'text', 'text': ...}",
                )
        return "".join(texts), markers
    raise RowProblem(where, f"'{where}' is {_shown(content)}; expected text", "give the message text")


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RowProblem(name, f"'{name}' is {_shown(value)}; expected a string", f"give '{name}' as text")
    return value


def _required(value: Mapping[str, Any], name: str) -> Any:
    if name not in value or value[name] is None:
        raise RowProblem(name, f"the row has no '{name}'", f"add the '{name}' response")
    return value[name]


def _images(value: Mapping[str, Any]) -> list[Any]:
    if value.get("images") is not None:
        images = value["images"]
        if not isinstance(images, list):
            raise RowProblem("images", f"'images' is {_shown(images)}; expected a list", "give a list of paths")
        return list(images)
    if value.get("image") is not None:
        return [value["image"]]
    return []


def _shown(value: Any) -> str:
    return f"a {type(value).__name__} ({shown(value, 40)})"
