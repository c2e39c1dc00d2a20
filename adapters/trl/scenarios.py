"""``vlm-dpo train --scenario NAME``: a known failure on the tiny model, without the plugins and with them.

Each scenario trains the tiny LLaVA twice on the same data, seed and settings: once
with stock ``trl.DPOTrainer`` (what users run today, everything trainable) and once with
``VLMDPOTrainer`` (the default plugin config), prints both per-step tables side by side
and a verdict made only of what was measured, and writes both runs' ``metrics.jsonl``
and a ``comparison.png``. A run that stops with an error (the plugins refusing bad
data) is a result: its message is printed.

The tiny model is random and small; a scenario reproduces the *mechanism* of each
failure (weights that should not move, a loss with nothing to learn, a NaN reaching
the weights, an adapter with no effect), not the weeks of GPU time around it.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

STOCK, PLUGINS = "stock trl.DPOTrainer", "VLMDPOTrainer"


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    failure: str
    fix: str
    steps: int
    learning_rate: float
    prepare_rows: Callable[[list[dict]], list[dict]] = lambda rows: rows
    callbacks: Callable[[], list[Any]] = lambda: []
    lora: bool = False


@dataclass
class RunOutcome:
    label: str
    records: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    findings: list[str] = field(default_factory=list)
    moved: dict[str, float] = field(default_factory=dict)
    """Relative L2 change of each parameter group's weights over the run."""
    finite_weights: bool = True
    skipped_steps: int = 0


@dataclass
class ScenarioComparison:
    scenario: Scenario
    stock: RunOutcome
    plugins: RunOutcome
    verdict: list[str] = field(default_factory=list)
    plot_path: Path | None = None


class _InjectNonFiniteGradient:
    """Inf in one language-model gradient before optimizer step ``at_step``: what a bf16 overflow looks like."""

    def __new__(cls, at_step: int):
        from transformers import TrainerCallback

        class Inject(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                if state.global_step == at_step:
                    parameter = next(p for n, p in model.named_parameters() if p.grad is not None and "lm_head" in n)
                    parameter.grad.view(-1)[0] = math.inf

        return Inject()


def _identical(rows: list[dict]) -> list[dict]:
    broken = copy.deepcopy(rows)
    for row in broken:
        row["rejected"] = copy.deepcopy(row["chosen"])
    return broken


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            "unfrozen-vision",
            "vision tower and projector left trainable",
            "LLaVA DPO: loss rises, reward accuracy ~0.5, chosen and rejected rewards move together",
            "freeze the vision tower and projector, train the language model (the default policy)",
            steps=12,
            learning_rate=1e-2,
        ),
        Scenario(
            "identical-pairs",
            "chosen and rejected identical",
            "DPO loss stuck at 0.6931 (ln 2), rewards equal, nothing learns",
            "check every pair before step 0 and name the rows (collation checks)",
            steps=6,
            learning_rate=5e-3,
            prepare_rows=_identical,
        ),
        Scenario(
            "bf16-overflow",
            "a non-finite gradient at step 3 (injected, as a bf16 overflow shows up)",
            "Qwen2-VL bf16: the loss turns NaN and never recovers",
            "skip the step on every rank without touching weights, optimizer state or schedule (guards)",
            steps=8,
            learning_rate=5e-3,
            callbacks=lambda: [_InjectNonFiniteGradient(3)],
        ),
        Scenario(
            "lora-inert",
            "LoRA with lora_alpha=1 for r=64 and a full-fine-tuning learning rate",
            "LLaVA LoRA fine-tuning 'does nothing'",
            "detect that the adapter leaves the outputs unchanged and name alpha/r and the learning rate",
            steps=12,
            learning_rate=5e-7,
            lora=True,
        ),
    )
}


def run_scenario(
    name: str, output_dir: str | Path, *, steps: int | None = None, seed: int = 0, out: TextIO | None = None
) -> ScenarioComparison:
    out = out or sys.stdout
    scenario = SCENARIOS[name]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet()
    from vlm_dpo_plugins.tiny import build_tiny_llava, make_preference_examples, trl_conversational_rows

    root = Path(output_dir) / name
    model_dir = build_tiny_llava(root / "tiny-llava", seed=seed)
    rows = scenario.prepare_rows(trl_conversational_rows(make_preference_examples(16, seed=seed)))
    steps = steps or scenario.steps
    print(f"scenario {name}: {scenario.title}\n  users report: {scenario.failure}\n  fix: {scenario.fix}", file=out)
    stock = _train(scenario, STOCK, model_dir, rows, root / "stock", steps, seed)
    plugins = _train(scenario, PLUGINS, model_dir, rows, root / "plugins", steps, seed)
    comparison = ScenarioComparison(scenario, stock, plugins)
    _print_side_by_side(stock, plugins, out)
    comparison.verdict = _verdict(scenario, stock, plugins)
    print("verdict:", file=out)
    for line in comparison.verdict:
        print(f"  {line}", file=out)
    comparison.plot_path = _plot(stock, plugins, root / "comparison.png", scenario)
    if comparison.plot_path is not None:
        print(f"  plot: {comparison.plot_path}", file=out, flush=True)
    return comparison


# -- one run ---------------------------------------------------------------------


def _train(scenario: Scenario, label: str, model_dir: Path, rows: list[dict], output: Path, steps: int, seed: int):
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.trainer_callback import PrinterCallback
    from vlm_dpo_plugins.adapters.trl.recording import StepRecorder
    from vlm_dpo_plugins.adapters.trl.trainer import VLMDPOTrainer

    from vlm_dpo_plugins.errors import VLMDPOError

    outcome = RunOutcome(label)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer: Any = None
    recorder = StepRecorder(
        metrics_path=output / "metrics.jsonl",
        events=lambda step: trainer.vlm_dpo_events(step) if isinstance(trainer, VLMDPOTrainer) else [],
    )
    if (output / "metrics.jsonl").exists():
        (output / "metrics.jsonl").unlink()
    args = trl.DPOConfig(
        output_dir=str(output),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=scenario.learning_rate,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        gradient_checkpointing=False,
    )
    kwargs: dict[str, Any] = dict(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoProcessor.from_pretrained(model_dir),
        callbacks=[recorder, *scenario.callbacks()],
    )
    if scenario.lora:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=64, lora_alpha=1, target_modules="all-linear", task_type="CAUSAL_LM")
    try:
        trainer = (VLMDPOTrainer if label == PLUGINS else trl.DPOTrainer)(**kwargs)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    except (VLMDPOError, ValueError) as error:
        outcome.error = str(error)
    outcome.records = recorder.records
    if isinstance(trainer, VLMDPOTrainer):
        outcome.findings = [str(finding) for finding in trainer.vlm_dpo_findings]
        outcome.skipped_steps = trainer.plugins.get_plugin("guards").skipped_steps
    trained = trainer.model if trainer is not None else model
    outcome.moved = _relative_change(trained, initial)
    outcome.finite_weights = all(bool(torch.isfinite(p).all()) for p in trained.parameters())
    return outcome


def _relative_change(model: Any, initial: dict[str, Any]) -> dict[str, float]:
    import torch

    prefixes = {"vision": "vision_tower.", "projector": "multi_modal_projector.", "language": "language_model."}
    changes = {}
    for group, prefix in prefixes.items():
        pairs = [(p.detach(), initial[n]) for n, p in _base_parameters(model) if prefix in n and n in initial]
        if pairs:
            delta = torch.sqrt(sum(((p - q).double() ** 2).sum() for p, q in pairs))
            norm = torch.sqrt(sum((q.double() ** 2).sum() for _, q in pairs))
            changes[group] = float(delta / norm) if norm > 0 else 0.0
    return changes


def _base_parameters(model: Any):
    # With PEFT, base weights sit under base_model.model.* and base_layer; compare them under their plain names.
    for name, parameter in model.named_parameters():
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        yield plain, parameter


# -- output ----------------------------------------------------------------------


def _print_side_by_side(stock: RunOutcome, plugins: RunOutcome, out: TextIO) -> None:
    columns = (("loss", "loss"), ("margin", "rewards/margins"), ("acc", "rewards/accuracies"), ("gnorm", "grad_norm"))
    width = 8
    half = "".join(f"{title:>{width}}" for title, _ in columns)
    print(f"{'':5}  {STOCK:^{width * len(columns)}}  |  {PLUGINS:^{width * len(columns)}}", file=out)
    print(f"{'step':>5}  {half}  |  {half}", file=out)
    by_step = {record["step"]: record for record in plugins.records}
    for record in stock.records or [{}]:
        step = record.get("step")
        if step is None:
            break
        ours = by_step.get(step, {})
        left = "".join(_cell(record.get(key), width) for _, key in columns)
        right = "".join(_cell(ours.get(key), width) for _, key in columns) if ours else f"{'-':>{width}}" * 4
        print(f"{step:>5}  {left}  |  {right}", file=out)
    for outcome in (stock, plugins):
        if outcome.error:
            lines = outcome.error.splitlines()
            shown = "\n    ".join(lines[:4]) + (f"\n    ... {len(lines) - 4} more line(s)" if len(lines) > 4 else "")
            print(f"{outcome.label} stopped: {shown}", file=out)
        for finding in outcome.findings:
            print(f"{outcome.label} finding: {finding}", file=out)


def _cell(value: Any, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:>{width}.4f}" if math.isfinite(value) else f"{value!s:>{width}}"


def _losses(outcome: RunOutcome) -> list[float]:
    return [record["loss"] for record in outcome.records if "loss" in record]


def _verdict(scenario: Scenario, stock: RunOutcome, plugins: RunOutcome) -> list[str]:
    lines = []
    if scenario.name == "unfrozen-vision":
        for outcome in (stock, plugins):
            moved = ", ".join(f"{group} {change:.2%}" for group, change in outcome.moved.items())
            last = outcome.records[-1] if outcome.records else {}
            lines.append(
                f"{outcome.label}: weights moved {moved}; last margin {last.get('rewards/margins', math.nan):.4f}, "
                f"accuracy {last.get('rewards/accuracies', math.nan):.2f}"
            )
    elif scenario.name == "identical-pairs":
        losses = _losses(stock)
        spread = max((abs(loss - math.log(2)) for loss in losses), default=math.nan)
        lines.append(f"{STOCK}: {len(losses)} steps, every loss within {spread:.1e} of ln 2, no message")
        lines.append(
            f"{PLUGINS}: "
            + (
                f"stopped before step 0: {plugins.error.splitlines()[0]}"
                if plugins.error
                else f"trained {len(_losses(plugins))} steps"
            )
        )
    elif scenario.name == "bf16-overflow":
        for outcome in (stock, plugins):
            # The Trainer's logging_nan_inf_filter logs a NaN loss as a stand-in value; the margins show the NaN.
            broken = [r["step"] for r in outcome.records if not math.isfinite(r.get("rewards/margins", 0.0))]
            lines.append(
                f"{outcome.label}: NaN metrics at {len(broken)} of {len(outcome.records)} steps"
                + (f" (from step {broken[0]})" if broken else "")
                + f"; weights {'finite' if outcome.finite_weights else 'contain NaN/Inf'}"
                + (f"; {outcome.skipped_steps} optimizer step skipped" if outcome.label == PLUGINS else "")
            )
    elif scenario.name == "lora-inert":
        for outcome in (stock, plugins):
            rewards = [abs(r.get("rewards/chosen", 0.0)) + abs(r.get("rewards/rejected", 0.0)) for r in outcome.records]
            lines.append(
                f"{outcome.label}: largest |reward| {max(rewards, default=math.nan):.1e} over {len(rewards)} steps; "
                f"{len(outcome.findings)} finding(s)"
            )
    return lines


def _plot(stock: RunOutcome, plugins: RunOutcome, path: Path, scenario: Scenario) -> Path | None:
    runs = {outcome.label: outcome.records for outcome in (stock, plugins) if outcome.records}
    if not runs:
        return None
    try:
        from vlm_dpo_plugins.runlog.plot import plot_runs

        return plot_runs(runs, path, title=f"{scenario.name}: {scenario.title}")
    except ImportError:
        return None


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
