"""A generated table between two marker lines of a docs page (standard library only)."""

from __future__ import annotations


def with_table(page: str, table: str, begin: str, end: str) -> str:
    """``page`` with what stands between ``begin`` and ``end`` replaced by ``table``."""
    if begin not in page or end not in page:
        raise SystemExit(f"the page has no table markers; add the two lines\n{begin}\n{end}")
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{table}\n{end}{tail}"
