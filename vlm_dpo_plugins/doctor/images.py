"""Image checks over a whole dataset: each distinct file opened once, in parallel threads.

Pillow reads and verifies outside the GIL for most of the work, and datasets often reuse
one image in many rows, so distinct paths are checked once each and their result shared.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ImageResult:
    problem: str | None
    size: tuple[int, int] | None = None  # (width, height)


def resolve(entry: Any, roots: tuple[Path, ...]) -> tuple[str, Any]:
    """A hashable key for the entry and what to open: a resolved path, bytes, or a URL left alone."""
    if isinstance(entry, dict):
        if entry.get("bytes") is not None:
            data = entry["bytes"]
            data = base64.b64decode(data) if isinstance(data, str) else data
            return f"bytes:{id(entry)}", bytes(data)
        entry = entry.get("path") if entry.get("path") is not None else entry.get("url")
    if not isinstance(entry, str):
        return f"invalid:{id(entry)}", None
    if "://" in entry or entry.startswith("data:"):
        return f"url:{entry}", entry
    candidates = [Path(entry)] if os.path.isabs(entry) else [root / entry for root in roots]
    found = next((path for path in candidates if path.is_file()), candidates[0])
    return str(found), found


def check_images(
    targets: dict[str, Any], workers: int, progress: Callable[[int], None] | None = None
) -> dict[str, ImageResult]:
    keys = list(targets)
    results: dict[str, ImageResult] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for key, result in zip(keys, pool.map(lambda key: inspect(targets[key]), keys, chunksize=64)):
            results[key] = result
            if progress is not None:
                progress(1)
    return results


def inspect(target: Any) -> ImageResult:
    if target is None:
        return ImageResult("the image entry is neither a path nor {'path'/'bytes'}")
    if isinstance(target, str):  # a URL: not fetched before training
        return ImageResult(None)
    if isinstance(target, Path):
        if not target.is_file():
            return ImageResult(f"the image file {str(target)!r} does not exist")
        if target.stat().st_size == 0:
            return ImageResult(f"the image file {str(target)!r} is empty (0 bytes)")
        source: Any = target
        described = f"the image file {str(target)!r}"
    else:
        source, described = io.BytesIO(target), "the image bytes"
    try:
        from PIL import Image
    except ImportError:
        return ImageResult(None)
    try:
        with Image.open(source) as image:
            size = image.size
            image.verify()
    except Exception as error:
        return ImageResult(f"{described} cannot be read as an image ({type(error).__name__}: {error})")
    return ImageResult(None, size)
