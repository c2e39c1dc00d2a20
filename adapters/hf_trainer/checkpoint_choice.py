"""Which checkpoint a resumed run starts from: never one whose save was cut off.

transformers' ``get_last_checkpoint`` picks the highest-numbered ``checkpoint-N`` folder whether or not
its save finished, and LLaMA-Factory resumes from that folder on its own. A run killed while saving (a
preempted node, SIGKILL, a full disk) then resumes from weights without optimizer state, or from a
truncated ``trainer_state.json``, and crashes or quietly restarts the optimizer.

So the plugin trainers mark a checkpoint as being written (one marker per rank, created before the
Trainer writes anything into the folder, removed after the plugins' own state, written last) and
resume only from a complete one: a folder with no marker left behind and a readable
``trainer_state.json`` (which the Trainer writes after the weights, optimizer, scheduler and RNG
states). A checkpoint written without the plugins is judged by its ``trainer_state.json`` alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger("vlm_dpo_plugins.adapters")

SAVING_MARKER = "vlm_dpo_saving.rank{rank}"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def mark_saving(checkpoint_dir: str | os.PathLike, rank: int) -> None:
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SAVING_MARKER.format(rank=rank)).touch()


def mark_saved(checkpoint_dir: str | os.PathLike, rank: int) -> None:
    (Path(checkpoint_dir) / SAVING_MARKER.format(rank=rank)).unlink(missing_ok=True)


def why_incomplete(checkpoint_dir: str | os.PathLike) -> str | None:
    """None for a checkpoint a run can resume from; otherwise what is wrong with it."""
    folder = Path(checkpoint_dir)
    left_behind = sorted(path.name for path in folder.glob(SAVING_MARKER.format(rank="*")))
    if left_behind:
        return f"its save was interrupted ({', '.join(left_behind)} left behind)"
    try:
        json.loads((folder / TRAINER_STATE).read_text())
    except FileNotFoundError:
        return f"it has no {TRAINER_STATE}"
    except (ValueError, OSError) as error:
        return f"its {TRAINER_STATE} cannot be read ({error})"
    return None


def _step(folder: Path) -> int:
    return int(_CHECKPOINT.match(folder.name).group(1))


def _checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if path.is_dir() and _CHECKPOINT.match(path.name)]
    return sorted(found, key=_step, reverse=True)


def choose_checkpoint(requested: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """The folder to resume from for ``resume_from_checkpoint=requested``, skipping incomplete ones loudly.

    ``True``: the newest complete checkpoint in ``output_dir``. A ``checkpoint-N`` path: that checkpoint if
    complete, else the newest complete one before it in the same folder (LLaMA-Factory passes the newest one
    it found, complete or not). Raises ``ValueError`` naming every folder tried and its defect when none is
    complete.
    """
    if not requested:
        return None
    if requested is True:
        candidates = _checkpoints(Path(output_dir))
        if not candidates:
            raise ValueError(f"no checkpoint-* folder to resume from in {output_dir}")
    else:
        asked = Path(requested)
        if not asked.is_dir():
            return str(requested)  # not ours to judge: the Trainer says what is missing
        if not _CHECKPOINT.match(asked.name):
            candidates = [asked]
        else:
            candidates = [asked, *(path for path in _checkpoints(asked.parent) if _step(path) < _step(asked))]
    skipped = []
    for folder in candidates:
        defect = why_incomplete(folder)
        if defect is None:
            if skipped:
                logger.warning(
                    "vlm-dpo: not resuming from %s; resuming from %s, the newest complete checkpoint",
                    "; ".join(skipped),
                    folder,
                )
            return str(folder)
        skipped.append(f"{folder}: {defect}")
    raise ValueError("no complete checkpoint to resume from (" + "; ".join(skipped) + ")")
