"""The plugins' own state inside a Trainer checkpoint folder, one JSON file per rank.

Skip counters, the spike window, learning-rate back-off, detector state and collation
counters live in the plugins, not in the model or optimizer, so a resumed run would
otherwise start them from zero (a run halting after 8 consecutive skips could then
skip 8 more). Each rank writes its own file because collation counters are per rank;
guard state is identical on every rank. A resumed run with a different world size
reads rank 0's file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.errors import PluginError

logger = logging.getLogger("vlm_dpo_plugins.adapters")

STATE_FILE = "vlm_dpo_plugins_state.rank{rank}.json"


def state_path(checkpoint_dir: str | os.PathLike, rank: int) -> Path:
    return Path(checkpoint_dir) / STATE_FILE.format(rank=rank)


def collect_state(manager: Any, adapter_state: Mapping[str, Any]) -> dict[str, Any]:
    states = manager.collect_states()
    if "adapter" in states:
        raise PluginError("a plugin saves its checkpoint state under the key 'adapter', which the adapter uses itself")
    return {"adapter": dict(adapter_state), **states}


def write_state(checkpoint_dir: str | os.PathLike, rank: int, states: Mapping[str, Any]) -> Path:
    path = state_path(checkpoint_dir, rank)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(states, indent=1, sort_keys=True))
    partial.replace(path)  # a reader never sees half a file
    return path


def read_state(checkpoint_dir: str | os.PathLike, rank: int) -> dict[str, Any] | None:
    """This rank's saved state, rank 0's when this rank has none, or None (a checkpoint from stock TRL)."""
    for candidate in (state_path(checkpoint_dir, rank), state_path(checkpoint_dir, 0)):
        if candidate.exists():
            return json.loads(candidate.read_text())
    logger.warning(
        "%s has no %s: it was not written by VLMDPOTrainer, so the plugins' counters (skipped steps, detectors) "
        "start from zero",
        checkpoint_dir,
        STATE_FILE.format(rank=rank),
    )
    return None
