"""Running a framework's own command line from a test: an isolated environment and the console script.

Importable from any test module (``pythonpath`` in pyproject.toml), because the framework
tests run the real CLIs as subprocesses and each must not touch the real HOME or a hub.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Mapping
from pathlib import Path


def free_port() -> int:
    """A TCP port free right now, for a launcher's MASTER_PORT (two runs at once must not collide)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torch_extensions_dir() -> str:
    """Where DeepSpeed's compiled CPU communication op is kept between runs: outside any test's temporary HOME, so
    it is compiled once, and one folder per environment, since the build names the environment's own include path
    (a folder shared by two environments is compiled again each time the other one used it)."""
    import hashlib

    environment = f"{Path(sys.prefix).name}-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]}"
    return str(Path.home() / ".cache" / "vlm-dpo-plugins" / "torch_extensions" / environment)


def gate_opened_at_startup(folder, module: str) -> dict[str, str]:
    """Environment for a framework's CLI whose processes (torchrun's ranks too) call ``module.open_gate()`` at
    start-up: a ``sitecustomize`` module in ``folder``, on ``PYTHONPATH`` with this folder (where the gates live)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(f"from {module} import open_gate\n\nopen_gate()\n")
    return {"PYTHONPATH": f"{folder}:{Path(__file__).parent}"}


JOINED = {"PYTHONPATH": os.pathsep, "VLM_DPO_LOAD_PLUGINS": ","}
"""Variables that several environments each add to rather than set: folders on the path, plugins to load."""


def merged_environments(*environments: Mapping[str, str]) -> dict[str, str]:
    """Several environments of gates and test plugins as one: later values win, except that each of ``JOINED`` keeps
    every environment's entries, in order (one gate per run: its ``sitecustomize`` is the one on the path)."""
    merged: dict[str, str] = {}
    for environment in environments:
        merged.update(environment)
    for name, separator in JOINED.items():
        parts = [environment[name] for environment in environments if environment.get(name)]
        if parts:
            merged[name] = separator.join(parts)
    return merged


PASSED_THROUGH = ("PATH", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")


def isolated_env(tmp_path: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Offline, CPU-only, HOME and every cache inside ``tmp_path``; ``VLM_DPO_*`` settings pass through.

    ModelScope has no offline switch: ``USE_HF=1`` routes any hub lookup to the HF hub, which
    ``HF_HUB_OFFLINE=1`` then refuses (local model paths never reach a hub).
    """
    home = tmp_path / "home"
    cache = home / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key in PASSED_THROUGH or key.startswith("VLM_DPO_")}
    # Console scripts that re-execute ``python ...`` must find this environment's interpreter first.
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(cache),
        HF_HOME=str(cache / "huggingface"),
        HF_DATASETS_CACHE=str(cache / "huggingface" / "datasets"),
        MODELSCOPE_CACHE=str(cache / "modelscope"),
        MPLCONFIGDIR=str(cache / "matplotlib"),
        TRITON_CACHE_DIR=str(cache / "triton"),
        TORCH_HOME=str(cache / "torch"),
        NLTK_DATA=str(cache / "nltk"),
        USE_HF="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TRL_EXPERIMENTAL_SILENCE="1",
        CUDA_VISIBLE_DEVICES="",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),  # nox runs two test workers on two cores
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def console_script(name: str) -> str:
    """The path of console script ``name``, preferring the one beside the running interpreter."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    assert found, f"the `{name}` console script is neither next to the interpreter nor on PATH"
    return found
