"""Step time of VLMDPOTrainer against stock trl.DPOTrainer, on the same model, data, seed and config.

    python benchmarks/trl_step_overhead.py                                  # tiny LLaVA, hidden 32, CPU
    python benchmarks/trl_step_overhead.py --model qwen2_vl
    python benchmarks/trl_step_overhead.py --hidden-size 256 --repeats 4     # a less tiny LLaVA
    python benchmarks/trl_step_overhead.py --device cuda --hidden-size 1024
    python benchmarks/trl_step_overhead.py --profile                        # + cProfile of one run of each

Both trainers train every parameter group, two rows per pair (the plugin run with ``sharing`` off and
``freeze.trainable`` set to
all groups), so they do the same forward, backward and AdamW work and any difference is the
plugins: collation checks, the loss hook, the guarded optimizer step, metrics and detectors.

How it is timed:
- Runs alternate stock, plugins, plugins, stock, ... (ABBA), so a linear drift in the
  machine's speed costs both trainers the same; warm-up steps of each run are dropped.
- A callback takes ``time.perf_counter()`` at ``on_step_begin`` and ``on_step_end``
  (after a CUDA synchronize on GPU). Two times per optimizer step: the *window* (begin to
  end: forward, backward, optimizer step) and the *iteration* (one ``on_step_end`` to the
  next: the window plus fetching and collating the next batch and logging, which the
  Trainer does outside the window, and where the collation checks and the metric hooks run).
- Reported: median and IQR per trainer, the ratio of medians with a 95 % bootstrap
  interval (steps resampled within each trainer) and the range of the per-repeat ratios.
- Breakdown: the same trainer methods are wrapped in both runs (``get_batch_samples``,
  ``training_step``, ``compute_loss``, ``_maybe_log_save_evaluate``) and the torch
  optimizer's ``step``; with the Trainer's ``on_pre_optimizer_step``/``on_optimizer_step``
  this splits each iteration into phases, and the plugin-minus-stock median of each phase
  says where the extra time goes. The collation pre-scan before step 0 is a one-off pass
  over the dataset, not step time: it is reported as set-up.
- Measured directly: the plugins' hooks are timed through pluggy's hook-call monitoring,
  and the extra time is estimated from the collation hook plus the plugin-minus-stock
  difference of the light phases only. The heavy phases (model forwards, backward, AdamW,
  TRL's collator) do identical work in both runs and carry most of the run-to-run noise,
  so this estimate resolves a millisecond where the end-to-end ratio cannot resolve 3 %.
- ``--profile``: cProfile of one run of each trainer over the timed steps: the plugins'
  own functions by self time, and the library calls made more often with the plugins.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import os
import pstats
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLM_DPO_LOAD_PLUGINS", "none")  # a stray third-party plugin would be timed too
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, PrinterCallback, TrainerCallback  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402
from vlm_dpo_plugins.adapters.trl import VLMDPOTrainer  # noqa: E402

from vlm_dpo_plugins.tiny import (  # noqa: E402
    build_tiny_llava,
    build_tiny_qwen2_vl,
    make_preference_examples,
    trl_conversational_rows,
)

EVERYTHING_TRAINS = {
    "freeze": {"trainable": ["vision", "projector", "language"]},
    # The hooks' cost alone: with sharing the plugin run does less model work (benchmarks/pair_sharing.py).
    "sharing": {"prompt": False, "vision_features": False},
}
PHASES = (
    ("fetch", "next batch: dataloader + collator (plugins: + collation checks)"),
    ("step_begin", "on_step_begin callbacks (plugins: unfreeze check, step_begin hook)"),
    ("forward", "compute_loss: policy + reference forward, loss, metrics"),
    ("model_fwd", "  of which the models' forward calls (policy, reference)"),
    ("loss_glue", "  of which the rest: log-probs, loss hook, metrics"),
    ("backward", "training_step minus compute_loss"),
    ("grad_norm", "Trainer's clip before optimizer.step (plugins: its norm, clip_grad_norm_(inf))"),
    ("guard", "optimizer.step minus AdamW (plugins: per-group norms, clip, skip vote, hooks)"),
    ("adamw", "torch AdamW step"),
    ("after_step", "scheduler, zero_grad, on_step_end"),
    ("log", "_maybe_log_save_evaluate (plugins: metrics hooks, detectors)"),
)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PhaseTimer(TrainerCallback):
    """Per optimizer step: the callback window, the whole iteration, and the phases of the breakdown."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.windows: list[float] = []
        self.iterations: list[float] = []
        self.cpu_iterations: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.current: dict[str, float] = {}
        self.marks: dict[str, float] = {}
        self.first_step: float | None = None
        self.in_optimizer_step = False

    def now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        self.current[phase] = self.current.get(phase, 0.0) + seconds

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # the torch AdamW under accelerate's wrapper
        inner.step = self.timed(inner.step, "adamw")

    def on_step_begin(self, args, state, control, **kwargs):
        self.marks["begin"] = self.now()
        if self.first_step is None:
            self.first_step = self.marks["begin"]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.marks["pre_optimizer"] = self.now()
        self.in_optimizer_step = True
        self.add("grad_norm", self.marks["pre_optimizer"] - self.marks["training_step_end"])

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.marks["optimizer"] = self.now()
        self.in_optimizer_step = False
        self.add("guard", self.marks["optimizer"] - self.marks["pre_optimizer"] - self.current.get("adamw", 0.0))

    def on_step_end(self, args, state, control, **kwargs):
        end = self.now()
        self.add("after_step", end - self.marks["optimizer"])
        cpu_end = time.process_time()
        self.current["loss_glue"] = self.current.get("forward", 0.0) - self.current.get("model_forward", 0.0)
        self.current["model_fwd"] = self.current.pop("model_forward", 0.0)
        self.windows.append(end - self.marks["begin"])
        if "end" in self.marks:
            self.iterations.append(end - self.marks["end"])
            self.cpu_iterations.append(cpu_end - self.marks["cpu_end"])
            self.phases.append(self.previous_log_and_fetch | self.current)
        self.marks["end"], self.marks["cpu_end"] = end, cpu_end
        self.current = {}

    def timed(self, function, phase: str):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start = self.now()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(phase, self.now() - start)

        return wrapper

    def instrument(self, trainer) -> None:
        """Wrap the Trainer methods that bound the phases, on this instance only."""
        timer = self

        def training_step(*args, **kwargs):
            start = timer.now()
            if "begin" in timer.marks and "step_begin" not in timer.current:
                timer.add("step_begin", start - timer.marks["begin"])
            forward_before = timer.current.get("forward", 0.0)
            try:
                return original_training_step(*args, **kwargs)
            finally:
                timer.marks["training_step_end"] = timer.now()
                forward = timer.current.get("forward", 0.0) - forward_before
                timer.add("backward", timer.marks["training_step_end"] - start - forward)

        original_training_step = trainer.training_step
        trainer.training_step = training_step
        trainer.compute_loss = self.timed(trainer.compute_loss, "forward")
        # The model's own forward calls (policy, and the reference model when there is one) inside compute_loss:
        # the rest of compute_loss is glue (log-probs, loss, metrics), where the two trainers' code differs.
        for model in {id(m): m for m in (trainer.model, trainer.ref_model) if m is not None}.values():
            model.forward = self.timed(model.forward, "model_forward")
        # Logging of step k and fetching of step k+1's batch happen between two step ends: they are booked
        # to the iteration that ends at step k+1.
        self.previous_log_and_fetch: dict[str, float] = {}
        original_log, original_fetch = trainer._maybe_log_save_evaluate, trainer.get_batch_samples

        def log_save_evaluate(*args, **kwargs):
            start = timer.now()
            try:
                return original_log(*args, **kwargs)
            finally:
                timer.previous_log_and_fetch = {"log": timer.now() - start}

        def get_batch_samples(*args, **kwargs):
            start = timer.now()
            try:
                return original_fetch(*args, **kwargs)
            finally:
                timer.previous_log_and_fetch["fetch"] = timer.now() - start

        trainer._maybe_log_save_evaluate = log_save_evaluate
        trainer.get_batch_samples = get_batch_samples
        if isinstance(trainer, VLMDPOTrainer):
            self.monitor_hooks(trainer)

    def monitor_hooks(self, trainer) -> None:
        """Time spent inside the plugins' hooks, outermost calls only, the framework's collator taken out.

        Hooks called by the guarded step are left to the ``guard`` phase, which holds them already.
        """
        self.collator_seconds = 0.0
        collator = trainer.data_collator  # HookedCollator: vlm_dpo_collate around TRL's own collator
        framework_collate = collator.collate

        def timed_collate(examples):
            start = self.now()
            try:
                return framework_collate(examples)
            finally:
                self.collator_seconds += self.now() - start

        collator.collate = timed_collate
        calls: list[tuple[float, float]] = []

        def before(hook_name, implementations, kwargs):
            calls.append((self.now(), self.collator_seconds))

        def after(outcome, hook_name, implementations, kwargs):
            start, collator_before = calls.pop()
            if calls or self.in_optimizer_step:
                return
            self.add(f"hook {hook_name}", self.now() - start - (self.collator_seconds - collator_before))

        trainer.plugins.add_hookcall_monitoring(before, after)


def build_trainer(kind: str, model_dir: Path, rows: list[dict], options, output: Path, callbacks=()):
    torch.manual_seed(0)
    args = trl.DPOConfig(
        output_dir=str(output),
        max_steps=options.warmup + options.steps + 1,  # + 1: an iteration is measured from the previous step's end
        per_device_train_batch_size=options.batch_size,
        learning_rate=1e-4,
        logging_steps=options.logging_steps,
        report_to="none",
        save_strategy="no",
        use_cpu=options.device == "cpu",
        seed=0,
        disable_tqdm=True,
    )
    trainer_class = VLMDPOTrainer if kind == "plugins" else trl.DPOTrainer
    extra = {"vlm_dpo_config": EVERYTHING_TRAINS} if kind == "plugins" else {}
    trainer = trainer_class(
        model=AutoModelForImageTextToText.from_pretrained(model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoProcessor.from_pretrained(model_dir),
        callbacks=list(callbacks),
        **extra,
    )
    trainer.remove_callback(PrinterCallback)  # printing every log line would be timed too
    return trainer


def one_run(kind: str, model_dir: Path, rows: list[dict], options, output: Path) -> dict:
    timer = PhaseTimer(options.device)
    trainer = build_trainer(kind, model_dir, rows, options, output, callbacks=[timer])
    timer.instrument(trainer)
    start = time.perf_counter()
    trainer.train()
    skip = options.warmup
    return {
        "windows": timer.windows[skip + 1 :],
        "iterations": timer.iterations[skip:],
        "cpu_iterations": timer.cpu_iterations[skip:],
        "phases": timer.phases[skip:],
        "setup": timer.first_step - start,  # Trainer set-up, and for the plugins the collation pre-scan
    }


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def bootstrap_ratio(plugin: list[float], stock: list[float], rounds: int = 2000) -> tuple[float, float]:
    rng = random.Random(0)
    ratios = sorted(
        statistics.median(rng.choices(plugin, k=len(plugin))) / statistics.median(rng.choices(stock, k=len(stock)))
        for _ in range(rounds)
    )
    return ratios[int(0.025 * rounds)], ratios[int(0.975 * rounds) - 1]


def report_times(label: str, results: dict[str, list[dict]], key: str) -> None:
    pooled = {kind: [t for run in runs for t in run[key]] for kind, runs in results.items()}
    per_repeat = [
        statistics.median(plugin[key]) / statistics.median(stock[key])
        for stock, plugin in zip(results["stock"], results["plugins"])
    ]
    print(f"\n{label}")
    for kind, name in (("stock", "stock trl.DPOTrainer"), ("plugins", "VLMDPOTrainer")):
        q1, median, q3 = quartiles(pooled[kind])
        print(f"  {name:<22} median {median * 1e3:9.2f} ms   IQR {q1 * 1e3:9.2f} .. {q3 * 1e3:9.2f} ms")
    ratio = statistics.median(pooled["plugins"]) / statistics.median(pooled["stock"])
    low, high = bootstrap_ratio(pooled["plugins"], pooled["stock"])
    print(
        f"  ratio plugins/stock    {ratio:.3f}   95% bootstrap {low:.3f} .. {high:.3f}   "
        f"per-repeat {min(per_repeat):.3f} .. {max(per_repeat):.3f}"
    )


LIGHT_PHASES = ("step_begin", "loss_glue", "grad_norm", "guard", "after_step", "log")


def phase_median(runs: list[dict], phase: str) -> float:
    return statistics.median(step.get(phase, 0.0) for run in runs for step in run["phases"])


def report_plugin_time(results: dict[str, list[dict]]) -> None:
    """The plugins' extra time per step from the light phases and the collation hook, each measured directly.

    The heavy phases (model forwards, backward, AdamW, TRL's collator) do the same work in both runs, and
    their run-to-run noise on a shared machine is larger than the whole overhead; leaving them out gives an
    estimate whose noise is that of a few milliseconds of Python.
    """
    steps = [step for run in results["plugins"] for step in run["phases"]]
    hooks = sorted({phase for step in steps for phase in step if phase.startswith("hook ")})
    print("\nthe plugins' own time, measured directly (median ms per step)")
    print("  hooks, outermost calls outside the guarded step (TRL's collator taken out of vlm_dpo_collate):")
    for hook in hooks:
        print(
            f"    {statistics.median(step.get(hook, 0.0) for step in steps) * 1e3:8.3f}  {hook.removeprefix('hook ')}"
        )
    collate = statistics.median(step.get("hook vlm_dpo_collate", 0.0) for step in steps)
    deltas = {
        phase: phase_median(results["plugins"], phase) - phase_median(results["stock"], phase) for phase in LIGHT_PHASES
    }
    added = collate + sum(deltas.values())
    print("  extra time: the collation hook, and plugins minus stock in each light phase:")
    print(f"    {collate * 1e3:+8.3f}  vlm_dpo_collate (checks, pair conversion, policy)")
    for phase, delta in deltas.items():
        print(f"    {delta * 1e3:+8.3f}  {phase}")
    stock_iteration = statistics.median(t for run in results["stock"] for t in run["iterations"])
    print(
        f"    {added * 1e3:+8.3f}  total, against the stock median iteration of {stock_iteration * 1e3:.2f} ms: "
        f"ratio {(stock_iteration + added) / stock_iteration:.3f}"
    )


def report_phases(results: dict[str, list[dict]]) -> None:
    print("\nwhere the time goes: median per step, ms (phases of the iteration)")
    print(f"  {'phase':<11}{'stock':>9}{'plugins':>9}{'extra':>9}  what")
    for phase, meaning in PHASES:
        medians = {
            kind: statistics.median(step.get(phase, 0.0) for run in runs for step in run["phases"]) * 1e3
            for kind, runs in results.items()
        }
        extra = medians["plugins"] - medians["stock"]
        print(f"  {phase:<11}{medians['stock']:9.2f}{medians['plugins']:9.2f}{extra:+9.2f}  {meaning}")
    setup = {kind: statistics.median(run["setup"] for run in runs) for kind, runs in results.items()}
    print(f"  set-up before step 0 (not step time): stock {setup['stock']:.2f} s, plugins {setup['plugins']:.2f} s")


def is_plugin_code(filename: str) -> bool:
    return "vlm_dpo_plugins" in filename or "/adapters/" in filename


class ProfileSteps(TrainerCallback):
    """cProfile from the first step after warm-up to the end of training."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.profiler = cProfile.Profile()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.profiler.enable()

    def on_train_end(self, args, state, control, **kwargs):
        self.profiler.disable()


def profile(model_dir: Path, rows: list[dict], options, work: Path, top: int) -> None:
    """cProfile of one run of each trainer; the plugins' own functions and the calls whose count differs."""
    stats = {}
    for kind in ("stock", "plugins"):
        window = ProfileSteps(options.warmup)
        trainer = build_trainer(kind, model_dir, rows, options, work / f"profile-{kind}", callbacks=[window])
        trainer.train()
        stats[kind] = pstats.Stats(window.profiler, stream=io.StringIO()).stats
    steps = options.steps + 1

    def label(key) -> str:
        filename, line, name = key
        return f"{'/'.join(Path(filename).parts[-2:])}:{line}({name})"

    print(f"\ncProfile, one run each, the {steps} steps after warm-up (set-up and pre-scan left out), ms per step")
    print("  plugins' own code, by self time (cumulative: with everything it calls, the model included):")
    own = sorted(
        ((key, value) for key, value in stats["plugins"].items() if is_plugin_code(key[0])),
        key=lambda item: -item[1][2],
    )
    for key, (_, calls, own_time, cumulative, _) in own[:top]:
        print(
            f"    self {own_time / steps * 1e3:7.3f}  cumulative {cumulative / steps * 1e3:8.2f}  "
            f"{calls / steps:6.1f} calls  {label(key)}"
        )
    print("  library calls made more often with the plugins (extra calls per step, extra cumulative ms per step):")
    differing = []
    for key, (_, calls, _, cumulative, _) in stats["plugins"].items():
        if is_plugin_code(key[0]):
            continue
        _, base_calls, _, base_cumulative, _ = stats["stock"].get(key, (0, 0, 0, 0.0, None))
        if calls > base_calls:
            differing.append((cumulative - base_cumulative, calls - base_calls, key))
    for extra_time, extra_calls, key in sorted(differing, reverse=True)[:top]:
        print(f"    {extra_time / steps * 1e3:+8.2f}  {extra_calls / steps:+7.1f} calls  {label(key)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("llava", "qwen2_vl"), default="llava")
    parser.add_argument("--hidden-size", type=int, default=32, help="width of the tiny model's towers (2 layers each)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps dropped at the start of each run")
    parser.add_argument("--repeats", type=int, default=6, help="runs per trainer, interleaved")
    parser.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--logging-steps", type=int, default=1)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="also cProfile one run of each trainer")
    parser.add_argument("--top", type=int, default=15, help="rows of each cProfile list")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    import logging

    logging.getLogger("vlm_dpo_plugins").setLevel(logging.ERROR)

    work = Path(tempfile.mkdtemp(prefix="vlm-dpo-bench-"))
    build = build_tiny_llava if options.model == "llava" else build_tiny_qwen2_vl
    model_dir = build(work / "model", hidden_size=options.hidden_size)
    total_steps = options.warmup + options.steps + 1
    rows = trl_conversational_rows(make_preference_examples(total_steps * options.batch_size, seed=0))
    parameters = sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(model_dir).parameters())

    results: dict[str, list[dict]] = {"stock": [], "plugins": []}
    for repeat in range(options.repeats):
        order = ("stock", "plugins") if repeat % 2 == 0 else ("plugins", "stock")
        for kind in order:
            results[kind].append(one_run(kind, model_dir, rows, options, work / f"{kind}{repeat}"))

    print(
        f"tiny {options.model}, hidden size {options.hidden_size}, {parameters / 1e6:.2f}M parameters, "
        f"batch {options.batch_size} pairs, {options.device}, {os.cpu_count()} CPU core(s), torch threads "
        f"{torch.get_num_threads()}; {options.repeats} runs per trainer (ABBA) x {options.steps} timed steps "
        f"after {options.warmup} warm-up; logging every {options.logging_steps} step(s)"
    )
    report_times("iteration (step end to step end: batch fetch + collation + step + logging)", results, "iterations")
    report_times("callback window (on_step_begin to on_step_end: forward, backward, optimizer)", results, "windows")
    report_times(
        "CPU time per iteration (all threads of this process; less sensitive to other load on the machine)",
        results,
        "cpu_iterations",
    )
    report_phases(results)
    report_plugin_time(results)
    if options.profile:
        profile(model_dir, rows, options, work, options.top)


if __name__ == "__main__":
    main()
