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
import binascii
import hashlib
import io
import os
import stat
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.preference_data.rows import json_type
from vlm_dpo_plugins.shown import error_reason, shown, shown_path

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
    """A relative path resolves against the first root that holds it (the first root when none does).

    Total: whatever a row holds, the answer is a target, and an entry that cannot name an image is an
    ``invalid`` target saying why, which the callers report as a finding on the row's field.
    """
    if entry is None:
        return _invalid(entry, "the image is None")
    if isinstance(entry, Mapping):
        return _locate_mapping(entry, roots)
    if isinstance(entry, (bytes, bytearray)):
        if not entry:
            return _invalid(entry, "the image bytes are empty")
        return _bytes_target(bytes(entry))
    if isinstance(entry, (str, os.PathLike)):
        return _locate_path(entry, roots)
    if isinstance(entry, (bool, int, float, list)):  # what else JSON can hold
        kind = f"a JSON {json_type(entry)} ({shown(entry)})"
        return _invalid(entry, f"the image entry is {kind}, neither a path nor {{'path'/'bytes'}}")
    return ImageTarget(f"memory:{id(entry)}")  # a decoded image (PIL, array) handed over by a framework


def _locate_mapping(entry: Mapping, roots: tuple[Path, ...]) -> ImageTarget:
    # datasets' Image feature writes both keys and decodes the bytes when there are any; so does this check.
    if entry.get("bytes") is not None:
        data = _entry_bytes(entry["bytes"])
        return data if isinstance(data, ImageTarget) else _bytes_target(data)
    for key in ("path", "url"):
        if entry.get(key) is not None:
            written = entry[key]
            if not isinstance(written, (str, os.PathLike)):
                kind = f"a JSON {json_type(written)} ({shown(written)})"
                return _invalid(entry, f"the image's '{key}' is {kind}, not a string")
            return _locate_path(written, roots)
    return _invalid(entry, "the image entry has neither 'bytes' nor 'path'")


def _entry_bytes(value: Any) -> bytes | ImageTarget:
    """The bytes of a ``{"bytes": ...}`` entry: raw bytes, base64 text, or a JSON list of byte values."""
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        try:  # line breaks are common in base64 text (MIME wraps at 76 characters); nothing else is skipped
            data = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError) as error:  # ValueError: non-ASCII characters in the text
            return _invalid(value, f"the image's 'bytes' is text but not valid base64 ({error})")
    elif isinstance(value, list):
        # bytes() of a list takes bools and raises on anything else out of 0..255: say which item is wrong.
        bad = next((i for i, item in enumerate(value) if type(item) is not int or not 0 <= item <= 255), None)
        if bad is not None:
            return _invalid(
                value, f"the image's 'bytes' is a list whose item {bad} is {shown(value[bad])}, not a byte (0..255)"
            )
        data = bytes(value)
    else:
        return _invalid(
            value, f"the image's 'bytes' is a JSON {json_type(value)} ({shown(value)}); expected base64 text or bytes"
        )
    if not data:
        return _invalid(value, "the image's 'bytes' is empty")
    return data


def _locate_path(entry: str | os.PathLike, roots: tuple[Path, ...]) -> ImageTarget:
    written = os.fspath(entry)
    if isinstance(written, bytes):
        return _invalid(entry, f"the image path {shown(written)} is bytes, not text")
    if not written.strip():
        return _invalid(entry, "the image path is an empty string" if not written else "the image path is blank")
    if "://" in written or written.startswith("data:"):
        return ImageTarget(f"url:{written}", url=written)
    if "\x00" in written:  # the OS refuses such a name; Path.is_file() would only say False
        return _invalid(entry, f"the image path {shown_path(written)} contains a NUL character")
    candidates = [Path(written)] if os.path.isabs(written) else [(root / written).absolute() for root in roots]
    found = next((path for path in candidates if _is_file(path)), candidates[0])
    return ImageTarget(str(found), path=found)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # e.g. ENAMETOOLONG: reported by inspect() with the reason
        return False


def _bytes_target(data: bytes) -> ImageTarget:
    # Keyed by content, not id(): rows are dropped as the scan goes, so an id can come back for other bytes.
    return ImageTarget(f"bytes:{hashlib.blake2b(data, digest_size=16).hexdigest()}", data=data)


def _invalid(entry: Any, reason: str) -> ImageTarget:
    return ImageTarget(f"invalid:{id(entry)}:{reason}", invalid=reason)


def inspect(target: ImageTarget, verify: bool = True) -> ImageResult:
    """Why the image cannot be used, or None; ``verify=False`` checks only that a file exists."""
    if target.invalid is not None:
        return ImageResult(target.invalid)
    if target.path is not None:
        return _inspect_file(target.path, verify)
    if target.data is not None:
        return _opened(io.BytesIO(target.data), "the image bytes") if verify else ImageResult(None)
    return ImageResult(None)  # a URL, or an image in memory


def _inspect_file(path: Path, verify: bool) -> ImageResult:
    described = f"the image file {shown_path(path)}"
    try:
        status = path.stat()
    except FileNotFoundError:
        return ImageResult(f"{described} does not exist")
    except (OSError, ValueError) as error:  # ENAMETOOLONG, ELOOP, EACCES on a folder on the way, ...
        return ImageResult(f"{described} cannot be reached ({error_reason(error)})")
    if stat.S_ISDIR(status.st_mode):
        return ImageResult(f"{described} is a folder, not an image file")
    if not stat.S_ISREG(status.st_mode):
        return ImageResult(f"{described} is not a regular file (a device, pipe or socket)")
    if status.st_size == 0:
        return ImageResult(f"{described} is empty (0 bytes)")
    return _opened(path, described) if verify else ImageResult(None)


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
        for key, result in zip(keys, pool.map(lambda key: _checked(targets[key]), keys, chunksize=64)):
            results[key] = result
            if progress is not None:
                progress(1)
    return results


def _checked(target: ImageTarget) -> ImageResult:
    try:
        return inspect(target)
    except Exception as error:  # one image the checks did not foresee must not take every other result with it
        return ImageResult(f"the image could not be checked ({error_reason(error)})")


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
        return ImageResult(f"{described} cannot be read as an image ({error_reason(error)})")
    return ImageResult(None, size)
