"""Values quoted in messages, bounded: a message shows enough of a rejected value to find it, never all of it.

Error messages quote what they reject, and the values come from users and plugins: a 50 MB
string, a YAML alias bomb that expands to billions of items, an integer of a million digits
(whose ``repr`` raises ``ValueError`` past 4300 digits). ``repr`` of such a value costs
memory and minutes before the user sees anything, so every message goes through ``shown``.
"""

from __future__ import annotations

import reprlib
from typing import Any

LIMIT = 80
"""Characters of a value a message shows."""

_BIG_INT_BITS = 256


class _Bounded(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxstring = LIMIT
        self.maxother = LIMIT
        self.maxlong = 40
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdeque = self.maxarray = 6
        self.maxdict = 4

    def repr_int(self, value: int, level: int) -> str:
        if value.bit_length() > _BIG_INT_BITS:  # repr itself would cost (or refuse) thousands of digits
            return f"<an integer of {value.bit_length()} bits>"
        return super().repr_int(value, level)


_REPR = _Bounded()


def shown(value: Any, limit: int = LIMIT) -> str:
    """``repr(value)``, at most about ``limit`` characters and cheap to compute whatever ``value`` holds."""
    try:
        text = _REPR.repr(value)
    except Exception as error:  # a third-party object whose __repr__ fails still gets a message
        text = f"<{type(value).__name__} (repr failed: {type(error).__name__})>"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


PATH_LIMIT = 240
"""Characters of a path a message shows: real paths fit whole; a hostile one keeps its end, the file name."""


def shown_path(path: Any, limit: int = PATH_LIMIT) -> str:
    """A file path, quoted, as ``repr`` quotes it; a very long one keeps its end, where the file name is."""
    text = str(path)
    if len(text) <= limit:
        return repr(text)
    return repr(f"...{text[-(limit - 3):]}")


def clipped(text: str, limit: int = 160) -> str:
    """Plain text (an exception's message, say) cut to ``limit`` characters."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def error_reason(error: BaseException) -> str:
    """``TypeName: message`` of an exception, bounded; an OSError without the file name the message already shows."""
    detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return f"{type(error).__name__}: {clipped(detail)}"
