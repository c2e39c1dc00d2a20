"""The ranks of one script as subprocesses on this machine (gloo), each printing one ``RESULT {json}`` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RankRun:
    results: dict[int, dict]
    """Each rank's ``RESULT`` (without its ``rank`` key), for the ranks that printed one."""
    timed_out: bool
    output: str


def run_ranks(
    script: Path, arguments: list[str], port: int, timeout: float, world_size: int = 2, env: dict | None = None
) -> RankRun:
    """Every rank of ``script``, killed after ``timeout`` seconds (a hang is what some of these runs show);
    ``env``: variables added to every rank's environment."""
    # accelerate records the engine of a run in this process's environment (ACCELERATE_USE_DEEPSPEED, ...): an
    # earlier test's would otherwise reach these ranks.
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("ACCELERATE_")}
    base = dict(
        inherited, WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
        **(env or {}),
    )
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), *arguments],
            env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world_size)
    ]
    outputs, timed_out = [], False
    try:
        for process in ranks:
            try:
                outputs.append(process.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                timed_out = True
                process.kill()
                outputs.append(process.communicate()[0])
    finally:
        for process in ranks:
            process.kill()
    results = {}
    for output in outputs:
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        if lines:
            result = json.loads(lines[-1].removeprefix("RESULT "))
            results[result.pop("rank")] = result
    return RankRun(results, timed_out, "\n".join(outputs))
