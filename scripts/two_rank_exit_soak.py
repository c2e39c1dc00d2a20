"""Consecutive two-rank CPU runs of a framework's own command line with the adapter; every run must exit 0.

    .nox/llamafactory/bin/python scripts/two_rank_exit_soak.py --framework llamafactory --runs 50
    .nox/swift/bin/python scripts/two_rank_exit_soak.py --framework swift --runs 50

Run with the framework's test environment's interpreter. Each run is a two-rank run like those of the
framework's ``test_distributed.py``, in the configuration of the reported crash at exit: LoRA with reentrant
gradient checkpointing asked for, which the guards keep and give DDP a static graph, 3 steps, a checkpoint after
every step: ``llamafactory-cli train`` (``FORCE_TORCHRUN=1 NPROC_PER_NODE=2``) or
``swift rlhf`` (``NPROC_PER_NODE=2 --use_cpu true``). Prints one line per run (exit code, seconds, any fatal
line such as ``terminate called without an active exception``) and a summary; the output of every failed run
is kept under ``--workdir``. Exits 1 if any run did not exit 0. ``--stock`` runs the framework without the
adapter (which trains there: without the adapter's static graph, reentrant checkpointing under DDP works as long as
``find_unused_parameters`` stays off). ``--keep-logs`` keeps every run's output, not only the failed ones'.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))

from framework_cli import free_port  # noqa: E402

FATAL = re.compile(
    r"terminate called|what\(\):|Fatal Python error|Segmentation fault|SIGABRT|Signal 6|exitcode\s*:\s*-"
)
STEPS = 3
STATIC_GRAPH = "reentrant checkpointing under DDP: static_graph"
"""The guards' line when they give DDP a static graph (the configuration of the reported crash)."""


def llamafactory_runner(workdir: Path, stock: bool):
    from llamafactory_runs import TINY_MODELS, dpo_config, run_llamafactory, write_dataset

    model_dir = TINY_MODELS["llava"].build(workdir / "model")
    dataset = workdir / "data"
    write_dataset(dataset, num_rows=8)
    # LLaMA-Factory's reentrant checkpointing, asked for: the guards keep it and give DDP a static graph.
    settings = {"max_steps": STEPS, "save_strategy": "steps", "save_steps": 1, "use_reentrant_gc": True}
    env = {"VLM_DPO_LLAMAFACTORY": "0"} if stock else {}

    def run(index: int, run_dir: Path) -> tuple[int, str]:
        config = dpo_config(TINY_MODELS["llava"], model_dir, dataset, run_dir / "out", "lora", **settings)
        result = run_llamafactory(run_dir, config, env=env, nproc=2, name="cfg")
        return result.returncode, result.output

    return run


def swift_runner(workdir: Path, stock: bool):
    spec = importlib.util.spec_from_file_location("swift_test_helpers", ROOT / "tests/adapters/swift/conftest.py")
    helpers = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = helpers  # its dataclasses look their module up
    spec.loader.exec_module(helpers)
    model = helpers.TINY_QWEN2_VL
    model_dir = model.build(workdir / "model")
    dataset = helpers.write_swift_dataset(workdir / "data" / "train.jsonl", 8)
    plugin = []
    if not stock:
        from vlm_dpo_plugins.adapters.swift import plugin_path

        plugin = ["--external_plugins", str(plugin_path())]

    def run(index: int, run_dir: Path) -> tuple[int, str]:
        output_dir = run_dir / "out"
        args = helpers.dpo_args(model, model_dir, dataset, output_dir, max_steps=STEPS, batch_size=2)
        args = [arg if arg != "full" else "lora" for arg in args]  # --tuner_type lora
        save = args.index("--save_steps")
        args[save + 1] = "1"
        args += ["--use_cpu", "true", "--gradient_checkpointing_kwargs", '{"use_reentrant": true}', *plugin]
        env = {"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}
        result = helpers.run_swift(args, run_dir, output_dir, env_extra=env, timeout=600)
        return result.returncode, result.stdout + result.stderr

    return run


RUNNERS = {"llamafactory": llamafactory_runner, "swift": swift_runner}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=sorted(RUNNERS), required=True)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=None, help="kept; a temporary folder by default")
    parser.add_argument("--stock", action="store_true", help="the framework without the adapter")
    parser.add_argument("--stop-at-first-failure", action="store_true")
    parser.add_argument("--keep-logs", action="store_true", help="keep the output of every run")
    options = parser.parse_args(argv)

    workdir = options.workdir or Path(tempfile.mkdtemp(prefix=f"exit-soak-{options.framework}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    print(
        f"{started:%Y-%m-%d %H:%M} UTC: {options.runs} two-rank {options.framework} runs"
        f"{' (stock)' if options.stock else ' with the adapter'}; work folder {workdir}",
        flush=True,
    )
    run = RUNNERS[options.framework](workdir, options.stock)
    codes: Counter[int] = Counter()
    failed: list[int] = []
    for index in range(1, options.runs + 1):
        run_dir = workdir / f"run-{index:03d}"
        began = time.monotonic()
        code, output = run(index, run_dir)
        seconds = time.monotonic() - began
        codes[code] += 1
        fatal = sorted({line.strip()[:160] for line in output.splitlines() if FATAL.search(line)})
        static = "static graph" if STATIC_GRAPH in output else "no static graph"
        print(
            f"run {index:3d}: exit {code} ({seconds:.0f} s, {static}){'  ' + ' | '.join(fatal) if fatal else ''}",
            flush=True,
        )
        if code != 0 or fatal or options.keep_logs:
            (workdir / f"run-{index:03d}.log").write_text(output)
        if code != 0 or fatal:
            failed.append(index)
            if options.stop_at_first_failure:
                break
        shutil.rmtree(run_dir, ignore_errors=True)
    total = sum(codes.values())
    print(
        f"summary: {codes[0]}/{total} runs exited 0; exit codes {dict(sorted(codes.items()))}; "
        f"failed runs {failed or 'none'} (logs in {workdir})",
        flush=True,
    )
    return 0 if codes[0] == total == options.runs else 1


if __name__ == "__main__":
    sys.exit(main())
