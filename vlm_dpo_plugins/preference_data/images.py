"""One image check for every reader of preference rows: resolve an entry, open it with Pillow, verify it.

An entry is what a row holds for one image: a path (absolute, or relative to the caller's roots),
a ``{"path"}``/``{"bytes"}`` dict (datasets' undecoded Image feature, ms-swift's form; bytes may be
base64 text), raw bytes, a URL, or an image already decoded in memory. URLs are not fetched before
training and decoded images are trusted; everything else is opened and verified, which reads the
structure and checksums without decoding every pixel. Without Pillow only existence is checked.

Datasets often reuse one image in many rows, so whole-file checks open each distinct file once
(``check_images``), in threads: the work is mostly I/O wait and Pillow's C code.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.preference_data.rows import json_type

DEFAULT_WORKERS = min(32, 4 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class ImageTarget:
    """Where one entry's image is; at most one of ``path``, ``data``, ``url``, ``invalid`` is set.

    None of them set means an image already decoded in memory: nothing to open.
    """

    key: str
    """Equal for entries naming the same file, so that file is opened once."""
    path: Path | None = None
    data: bytes | None = None
    url: str | None = None
    invalid: str | None = None
    """Why the entry names no image."""


@dataclass(frozen=True)
class ImageResult:
    problem: str | None
    size: tuple[int, int] | None = None
    """(width, height), when the image was opened."""


def locate(entry: Any, roots: tuple[Path, ...]) -> ImageTarget:
    """A relative path resolves against the first root that holds it (the first root when none does)."""
    if entry is None:
        return ImageTarget(f"invalid:{id(entry)}", invalid="the image is None")
    if isinstance(entry, Mapping):
        if entry.get("bytes") is not None:
            data = entry["bytes"]
            return ImageTarget(f"bytes:{id(entry)}", data=base64.b64decode(data) if isinstance(data, str) else data)
        if entry.get("path") is not None or entry.get("url") is not None:
            return locate(entry["path"] if entry.get("path") is not None else entry["url"], roots)
        return ImageTarget(f"invalid:{id(entry)}", invalid="the image entry has neither 'bytes' nor 'path'")
    if isinstance(entry, (bytes, bytearray)):
        return ImageTarget(f"bytes:{id(entry)}", data=bytes(entry))
    if isinstance(entry, (str, os.PathLike)):
        written = os.fspath(entry)
        if "://" in written or written.startswith("data:"):
            return ImageTarget(f"url:{written}", url=written)
        candidates = [Path(written)] if os.path.isabs(written) else [(root / written).absolute() for root in roots]
        found = next((path for path in candidates if path.is_file()), candidates[0])
        return ImageTarget(str(found), path=found)
    if isinstance(entry, (bool, int, float, list)):  # what else JSON can hold
        return ImageTarget(
            f"invalid:{id(entry)}",
            invalid=f"the image entry is a JSON {json_type(entry)}, neither a path nor {{'path'/'bytes'}}",
        )
    return ImageTarget(f"memory:{id(entry)}")  # a decoded image (PIL, array) handed over by a framework


def inspect(target: ImageTarget, verify: bool = True) -> ImageResult:
    """Why the image cannot be used, or None; ``verify=False`` checks only that a file exists."""
    if target.invalid is not None:
        return ImageResult(target.invalid)
    if target.path is not None:
        shown = str(target.path)
        if not target.path.is_file():
            return ImageResult(f"the image file {shown!r} does not exist")
        if target.path.stat().st_size == 0:
            return ImageResult(f"the image file {shown!r} is empty (0 bytes)")
        return _opened(target.path, f"the image file {shown!r}") if verify else ImageResult(None)
    if target.data is not None:
        return _opened(io.BytesIO(target.data), "the image bytes") if verify else ImageResult(None)
    return ImageResult(None)  # a URL, or an image in memory


def check_images(
    targets: Mapping[str, ImageTarget],
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, ImageResult]:
    """Each target inspected once, by key."""
    keys = list(targets)
    results: dict[str, ImageResult] = {}
    if not keys:
        return results
    with ThreadPoolExecutor(max_workers=max(1, min(workers or DEFAULT_WORKERS, len(keys)))) as pool:
        for key, result in zip(keys, pool.map(lambda key: inspect(targets[key]), keys, chunksize=64)):
            results[key] = result
            if progress is not None:
                progress(1)
    return results


def _opened(source: Any, described: str) -> ImageResult:
    try:
        from PIL import Image
    except ImportError:  # without Pillow only existence is checked
        return ImageResult(None)
    try:
        with Image.open(source) as image:
            size = image.size
            image.verify()
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return ImageResult(f"{described} cannot be read as an image ({type(error).__name__}: {error})")
    return ImageResult(None, size)
