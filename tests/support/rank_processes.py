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
    script: Path,
    arguments: list[str],
    port: int,
    timeout: float,
    world_size: int = 2,
    env: dict | None = None,
    ranks_per_node: int | None = None,
) -> RankRun:
    """Every rank of ``script``, killed after ``timeout`` seconds (a hang is what some of these runs show);
    ``env``: variables added to every rank's environment. ``ranks_per_node``: the ranks stand for nodes of that
    many ranks each, with the variables torchrun gives a rank on a node (LOCAL_RANK counts from 0 on each node,
    LOCAL_WORLD_SIZE, GROUP_RANK, NODE_RANK); without it every rank is on one node."""
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
            env=dict(base, RANK=str(rank), **_placement(rank, world_size, ranks_per_node)),
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


def _placement(rank: int, world_size: int, ranks_per_node: int | None) -> dict[str, str]:
    if ranks_per_node is None:
        return {"LOCAL_RANK": str(rank)}
    assert world_size % ranks_per_node == 0, (world_size, ranks_per_node)
    node = str(rank // ranks_per_node)
    return {
        "LOCAL_RANK": str(rank % ranks_per_node),
        "LOCAL_WORLD_SIZE": str(ranks_per_node),
        "GROUP_RANK": node,
        "NODE_RANK": node,
    }
