"""Precomputed reference log-probs, keyed by what each pair is, and handed to the step inside its batch.

A pair's key is a digest of the example the framework's collator receives: its token ids, its images (pixels,
or the bytes of the files it names) and every other field. Row positions are not used: a shuffled, resumed or
re-filtered run finds each pair's entry by content, and a pair whose tokens or images changed finds none.

``ReferenceAttach`` sits between the collation hooks and the framework's collator, so it sees exactly the
examples collated, in batch order: when every pair of a batch is cached, it adds ``REFERENCE_KEY`` (``[2B, 2]``:
summed log-prob and response tokens of each collated row, chosen rows first) to the batch, and the step takes it
out before any model call. It runs wherever the framework collates, DataLoader workers included.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vlm_dpo_plugins.errors import ConfigError

logger = logging.getLogger("vlm_dpo_plugins.sharing")

REFERENCE_KEY = "vlm_dpo_reference_logps"
KEYS_KEY = "vlm_dpo_reference_keys"
"""During the precompute pass only: each batch's pair keys, carried out of DataLoader workers with the batch."""
FILE_FORMAT = 1
Entry = tuple[float, float, int, int]
"""A pair's reference: chosen and rejected summed log-probs, chosen and rejected response tokens."""


# -- what a pair is ---------------------------------------------------------------------------------


def example_key(example: Mapping[str, Any], row: int | None = None) -> str:
    """The digest of one collator example: every field, tensors and images by their bytes, files by content."""
    digest = hashlib.sha256()
    _feed(digest, example, field="", row=row)
    return digest.hexdigest()


_file_digests: dict[tuple[str, int, int], bytes] = {}


def _feed(digest: Any, value: Any, *, field: str, row: int | None) -> None:
    if isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(repr(str(key)).encode())
            _feed(digest, value[key], field=f"{field}.{key}" if field else str(key), row=row)
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(f"[{len(value)}".encode())
        for item in value:
            _feed(digest, item, field=field, row=row)
        digest.update(b"]")
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, (bytes, bytearray)):
        digest.update(b"bytes%d" % len(value))
        digest.update(bytes(value))
    elif isinstance(value, str):
        digest.update(repr(value).encode())
        if len(value) < 4096 and "\0" not in value and os.path.isfile(value):
            # An image named by its path: a changed file is a changed pair.
            digest.update(_file_digest(value))
    elif value is None or isinstance(value, (bool, int, float)):
        digest.update(repr(value).encode())
    elif _is_pil_image(value):
        digest.update(f"image{value.mode}{value.size}".encode())
        digest.update(value.tobytes())
    elif hasattr(value, "dtype") and hasattr(value, "shape") and hasattr(value, "tobytes"):  # numpy
        digest.update(f"array{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.tobytes())
    else:
        where = f"row {row}" if row is not None else "a training row"
        raise ConfigError(
            f"sharing.reference: precompute cannot tell {where}'s field {field or '(the row)'!r} apart from another "
            f"row's: it holds a {type(value).__name__}, which has no content to hash; convert the field to "
            "tensors, lists, strings or images, or set sharing.reference: live"
        )


def _is_pil_image(value: Any) -> bool:
    return all(hasattr(value, name) for name in ("mode", "size", "tobytes", "getpixel"))


def _file_digest(path: str) -> bytes:
    stat = os.stat(path)
    known = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if known not in _file_digests:
        file_digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                file_digest.update(block)
        _file_digests[known] = file_digest.digest()
    return _file_digests[known]


# -- the cache on disk ------------------------------------------------------------------------------


class ReferenceCache:
    """The reference log-probs of one reference model (``fingerprint``), by pair key, in one JSON file."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.path = Path(folder) / f"reference-{fingerprint[:24]}.json"
        self.entries: dict[str, Entry] = {}

    def load(self) -> int:
        """The entries an earlier pass with the same reference wrote; a file that does not read is set aside."""
        if not self.path.is_file():
            return 0
        try:
            stored = json.loads(self.path.read_text(encoding="utf-8"))
            if stored.get("format") != FILE_FORMAT or stored.get("fingerprint") != self.fingerprint:
                raise ValueError("written for another reference model or file format")
            entries = {key: _entry(value) for key, value in stored["pairs"].items() if isinstance(key, str)}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            logger.warning("vlm-dpo: sharing.reference: %s does not read (%s); it is computed again", self.path, error)
            return 0
        self.entries.update(entries)
        return len(entries)

    def save(self, keys: Iterable[str]) -> None:
        """The entries of ``keys`` (this run's pairs), written whole or not at all."""
        pairs = {key: list(self.entries[key]) for key in keys if key in self.entries}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(
            json.dumps({"format": FILE_FORMAT, "fingerprint": self.fingerprint, "pairs": pairs}), encoding="utf-8"
        )
        os.replace(partial, self.path)

    def add(self, keys: Sequence[str], logps: torch.Tensor, token_counts: torch.Tensor) -> list[str]:
        """The collated rows' values (chosen rows first, as ``keys`` lists the pairs) recorded for the pairs not
        cached yet; those keys returned."""
        pairs = len(keys)
        values, counts = logps.detach().double().cpu().tolist(), token_counts.detach().cpu().tolist()
        added = []
        for pair, key in enumerate(keys):
            if key in self.entries:
                continue
            entry = (values[pair], values[pairs + pair], int(counts[pair]), int(counts[pairs + pair]))
            if not all(math.isfinite(value) for value in entry[:2]):
                raise ConfigError(
                    f"sharing.reference: the reference model's log-prob of a training pair is not finite ({entry[:2]}):"
                    " the reference cannot score this data; check the model's dtype and the row (or use the live "
                    "reference, whose non-finite steps the guards skip)"
                )
            self.entries[key] = entry
            added.append(key)
        return added

    def batch_tensor(self, keys: Sequence[str]) -> torch.Tensor | None:
        """``[2B, 2]`` for a batch whose pairs are all cached, else None."""
        found = [self.entries.get(key) for key in keys]
        if not found or any(entry is None for entry in found):
            return None
        chosen = [(entry[0], entry[2]) for entry in found]
        rejected = [(entry[1], entry[3]) for entry in found]
        return torch.tensor(chosen + rejected, dtype=torch.float64)


def _entry(value: Any) -> Entry:
    chosen, rejected, chosen_tokens, rejected_tokens = value
    entry = (float(chosen), float(rejected), int(chosen_tokens), int(rejected_tokens))
    if not all(math.isfinite(number) for number in entry[:2]) or min(entry[2:]) < 0:
        raise ValueError(f"entry {value!r} is not two finite log-probs and two token counts")
    return entry


# -- into the batch, and out of it ---------------------------------------------------------------------


class ReferenceAttach:
    """The framework's collator, adding each batch's cached reference log-probs when every pair has them."""

    def __init__(self, collate: Callable[[list[Mapping[str, Any]]], dict[str, Any]]) -> None:
        self.collate = collate
        self.cache: ReferenceCache | None = None
        self.carry_keys = False

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        if self.cache is None:
            return batch
        keys = [example_key(example) for example in examples]
        attached = self.cache.batch_tensor(keys)
        if attached is not None:
            batch[REFERENCE_KEY] = attached
        if self.carry_keys:
            batch[KEYS_KEY] = keys
        return batch

    def __getattr__(self, name: str) -> Any:
        if name in ("collate", "cache", "carry_keys"):  # not set yet (unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.collate, name)


def take_attached(batch: dict[str, Any]) -> torch.Tensor | None:
    """The batch's precomputed reference (``[2B, 2]``), removed from the batch so no model call sees it."""
    return batch.pop(REFERENCE_KEY, None)
