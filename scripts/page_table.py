"""A generated table between two marker lines of a docs page (standard library only)."""

from __future__ import annotations


def with_table(page: str, table: str, begin: str, end: str) -> str:
    """``page`` with what stands between ``begin`` and ``end`` replaced by ``table``."""
    if begin not in page or end not in page:
        raise SystemExit(f"the page has no table markers; add the two lines\n{begin}\n{end}")
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{table}\n{end}{tail}"


def finish(page_path, page: str, updated: str, not_passing: list[str], *, write: bool, table: str) -> int:
    """Write ``updated`` (``write``) or compare it with ``page``; say what did not pass; the exit status."""
    import sys

    if write:
        page_path.write_text(updated, encoding="utf-8")
        print(f"wrote the {table} of {page_path}")
    elif updated != page:
        print(f"{page_path} does not show these results; run with --write and commit it", file=sys.stderr)
    if not_passing:
        print("cells not passing:\n  " + "\n  ".join(not_passing), file=sys.stderr)
    return 1 if not_passing or (not write and updated != page) else 0
