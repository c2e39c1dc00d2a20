"""``vlm-dpo train --scenario NAME``: a known DPO failure reproduced on the tiny VLM, stock TRL beside the plugins.

Each scenario trains the tiny LLaVA twice on the same data with the same seed: with
stock ``trl.DPOTrainer`` (TRL's defaults: everything trainable, no checks) and with
``VLMDPOTrainer`` (the plugins' defaults). It prints both runs side by side, then a
verdict made only of what was measured, and writes each run's ``metrics.jsonl`` and
one ``comparison.png`` of both.

    from vlm_dpo_plugins.demo.scenarios import run_scenario
    comparison = run_scenario("bf16-overflow", "scenarios")
    comparison.measured["plugin_skipped_steps"]     # 1

Module-level imports stay light: the CLI reads ``SCENARIOS`` to build its ``--help``.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.validation import nearest

STOCK = "stock trl.DPOTrainer"
PLUGINS = "VLMDPOTrainer"
LN2 = math.log(2)
INJECTED_PARAMETER = "model.language_model.layers.0.mlp.up_proj.weight"
LANGUAGE_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


# -- what a scenario is and what it returns ------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """One scenario's training set-up, the same for both runs except where ``plugin_config`` says otherwise."""

    rows: list[dict[str, Any]]
    data: str
    steps: int
    batch_size: int
    learning_rate: float
    plugin_config: Mapping[str, Any] | None = None
    lora: Mapping[str, Any] | None = None
    inject_at_step: int | None = None
    notes: tuple[str, ...] = ()


@dataclass
class RunResult:
    """What one run did: its logged records, how its weights moved, and how it ended."""

    label: str
    records: list[dict[str, Any]]
    metrics_path: Path
    seconds: float = 0.0
    error: str | None = None
    error_rows: list[int] | None = None
    findings: list[Any] | None = None  # None: stock TRL has no findings mechanism
    skipped_steps: int | None = None
    weight_change: dict[str, float] = field(default_factory=dict)
    non_finite_weights: int = 0
    total_weights: int = 0
    lora_update: float | None = None

    @property
    def steps_trained(self) -> int:
        return len(self.records)

    def series(self, key: str) -> list[float]:
        return [float(record[key]) for record in self.records if key in record]


@dataclass
class ScenarioComparison:
    """Both runs, the quantities the verdict cites (``measured``), and the verdict's lines."""

    name: str
    stock: RunResult
    plugins: RunResult
    measured: dict[str, Any]
    verdict: list[str]
    plot_path: Path | None = None

    @property
    def stock_records(self) -> list[dict[str, Any]]:
        return self.stock.records

    @property
    def plugin_records(self) -> list[dict[str, Any]]:
        return self.plugins.records

    @property
    def plugin_findings(self) -> list[Any]:
        return self.plugins.findings or []

    @property
    def plugin_error(self) -> str | None:
        return self.plugins.error


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    failure: str
    fix: str
    plan: Callable[[int, int | None], RunPlan] = field(repr=False)
    judge: Callable[[RunResult, RunResult, RunPlan], tuple[dict[str, Any], list[str]]] = field(repr=False)


# -- running a scenario ----------------------------------------------------------------------


def run_scenario(
    name: str, output_dir: str | Path, *, steps: int | None = None, seed: int = 0, out: TextIO = sys.stdout
) -> ScenarioComparison:
    """Train stock ``trl.DPOTrainer`` and ``VLMDPOTrainer`` on scenario ``name``, print and return the comparison."""
    scenario = _scenario(name)
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps is {steps}; a scenario needs at least 1 step")
    plan = scenario.plan(seed, steps)
    if plan.lora is not None:
        _lora_config(plan.lora)  # before anything trains: a missing peft is a set-up error, not a result
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny model and its data are built here, never downloaded
    directory = Path(output_dir) / name
    directory.mkdir(parents=True, exist_ok=True)
    with _quiet_frameworks():
        from vlm_dpo_plugins.tiny import build_tiny_llava

        model_dir = build_tiny_llava(directory / "tiny-llava", seed=seed)
        _print_header(scenario, plan, seed, out)
        stock = _train(STOCK, plan, model_dir, directory / "stock", seed, out)
        plugins = _train(PLUGINS, plan, model_dir, directory / "plugins", seed, out)
    measured, verdict = scenario.judge(stock, plugins, plan)
    comparison = ScenarioComparison(name, stock, plugins, measured, verdict)
    _print_table(stock, plugins, out)
    _print_outcomes(stock, plugins, out)
    comparison.plot_path = _plot(comparison, directory / "comparison.png", scenario.title, out)
    _print_verdict(comparison, out)
    return comparison


def _scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise ConfigError(f"unknown scenario {name!r}; expected one of {sorted(SCENARIOS)}{nearest(name, SCENARIOS)}")
    return SCENARIOS[name]


class _quiet_frameworks:
    """transformers' warnings and progress bars off for the run, restored after: the table is the output."""

    def __enter__(self) -> None:
        import warnings

        from transformers.utils import logging as transformers_logging

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        self._verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        self._bars = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity(self._verbosity)
        if self._bars:
            transformers_logging.enable_progress_bar()
        self._warnings.__exit__(*exc)


def _train(label: str, plan: RunPlan, model_dir: Path, run_dir: Path, seed: int, out: TextIO) -> RunResult:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from vlm_dpo_plugins.adapters.trl.trainer import VLMDPOTrainer
    from vlm_dpo_plugins.demo.recording import StepRecorder

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)  # a new run writes a new log, never appended to an old one
    print(f"training {label} ...", file=out, flush=True)

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    groups = _parameter_groups(model)
    before = {name: (parameter, parameter.detach().clone()) for name, parameter in model.named_parameters()}
    trainer_holder: list[Any] = []
    recorder = StepRecorder(metrics_path=metrics_path, events=lambda step: _events(trainer_holder, step))
    callbacks: list[Any] = [recorder]
    if plan.inject_at_step is not None:
        callbacks.append(_non_finite_gradient_injector(plan.inject_at_step))
    kwargs: dict[str, Any] = dict(
        model=model,
        args=trl.DPOConfig(
            output_dir=str(run_dir),
            max_steps=plan.steps,
            per_device_train_batch_size=plan.batch_size,
            learning_rate=plan.learning_rate,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            seed=seed,
            disable_tqdm=True,
            gradient_checkpointing=False,  # TRL turns it on by default; it changes nothing here but the time
        ),
        train_dataset=Dataset.from_list(plan.rows),
        processing_class=AutoProcessor.from_pretrained(model_dir),
        peft_config=_lora_config(plan.lora),
        callbacks=callbacks,
    )
    trainer_class: Any = trl.DPOTrainer
    if label == PLUGINS:
        trainer_class = VLMDPOTrainer
        kwargs["vlm_dpo_config"] = dict(plan.plugin_config or {})

    result = RunResult(label, recorder.records, metrics_path)
    started = time.perf_counter()
    try:
        trainer = trainer_class(**kwargs)
        trainer_holder.append(trainer)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train()
    except Exception as error:  # a refusal or a crash is the outcome being compared, not a failure of the demo
        result.error = f"{type(error).__name__}: {error}"
        rows = getattr(error, "rows", None)
        result.error_rows = list(rows) if rows is not None else None
    result.seconds = time.perf_counter() - started
    if not metrics_path.exists():
        metrics_path.touch()  # a run refused before step 0 still has its (empty) log where the other run has one
    ended = "stopped before step 0" if result.error and not result.records else f"{len(result.records)} steps"
    print(f"  {label}: {ended}, {result.seconds:.1f} s", file=out, flush=True)
    _measure(result, trainer_holder[0] if trainer_holder else None, model, groups, before)
    return result


def _events(trainer_holder: list[Any], step: int) -> list[str]:
    trainer = trainer_holder[0] if trainer_holder else None
    return trainer.vlm_dpo_events(step) if hasattr(trainer, "vlm_dpo_events") else []


def _lora_config(settings: Mapping[str, Any] | None) -> Any:
    if settings is None:
        return None
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ConfigError("this scenario trains a LoRA adapter and needs peft: pip install peft") from error
    return LoraConfig(**settings)


def _parameter_groups(model: Any) -> Mapping[str, list[str]]:
    from vlm_dpo_plugins.manager import create_plugin_manager

    # Only the built-in classification: the measurement must not depend on which plugins happen to be installed.
    manager = create_plugin_manager(load_entry_points=False)
    model_type = getattr(model.config, "model_type", None)
    return manager.hook.vlm_dpo_classify_parameters(model=model, model_type=model_type) or {}


def _non_finite_gradient_injector(step: int) -> Any:
    from transformers import TrainerCallback

    class InjectOverflow(TrainerCallback):
        """An Inf in one gradient just before the optimizer step, as a bf16 overflow leaves one."""

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step != step:
                return
            parameters = dict(model.named_parameters())
            gradient = parameters[INJECTED_PARAMETER].grad
            if gradient is not None:
                gradient.view(-1)[0] = math.inf

    return InjectOverflow()


def _measure(result: RunResult, trainer: Any, model: Any, groups: Mapping[str, list[str]], before: dict) -> None:
    import torch

    from vlm_dpo_plugins.diagnostics.lora import find_lora_layers, update_size

    for group, names in groups.items():
        change = _relative_change([before[name] for name in names if name in before])
        if change is not None:
            result.weight_change[group] = change
    for parameter in model.parameters():
        result.total_weights += parameter.numel()
        result.non_finite_weights += int((~torch.isfinite(parameter.detach())).sum())
    if trainer is None:
        return
    size = update_size(find_lora_layers(trainer.model))
    result.lora_update = size.median if size is not None else None
    if hasattr(trainer, "vlm_dpo_findings"):
        result.findings = list(trainer.vlm_dpo_findings)
        guards = trainer.plugins.get_plugin("guards")
        result.skipped_steps = guards.skipped_steps if guards is not None else None


def _relative_change(pairs: Sequence[tuple[Any, Any]]) -> float | None:
    """||W_after - W_before|| / ||W_before|| over a group; the same Parameter objects even after PEFT renames them."""
    if not pairs:
        return None
    moved = sum(float(((parameter.detach() - initial) ** 2).sum()) for parameter, initial in pairs)
    size = sum(float((initial**2).sum()) for _, initial in pairs)
    return math.sqrt(moved / size) if size > 0 else None


# -- output ---------------------------------------------------------------------------------------

SIDE_COLUMNS = (("loss", "loss"), ("margin", "rewards/margins"), ("acc", "rewards/accuracies"), ("grad", "grad_norm"))
CELL = 8


def _print_header(scenario: Scenario, plan: RunPlan, seed: int, out: TextIO) -> None:
    lines = [
        f"scenario {scenario.name}: {scenario.title}",
        f"  what users report: {scenario.failure}",
        f"  the fix: {scenario.fix}",
        f"  set-up: tiny random-weight LLaVA on CPU; {plan.data}; batch {plan.batch_size}, {plan.steps} steps, "
        f"learning rate {plan.learning_rate:g}, seed {seed}; both runs train on the same data in the same order",
        f"  {STOCK}: TRL's defaults (everything trainable, no checks); {PLUGINS}: "
        + ("the plugins' defaults" if not plan.plugin_config else f"the plugins with {dict(plan.plugin_config)}"),
        *(f"  {note}" for note in plan.notes),
    ]
    print("\n".join(lines), file=out, flush=True)


def _print_table(stock: RunResult, plugins: RunResult, out: TextIO) -> None:
    side = " ".join(f"{title:>{CELL}}" for title, _ in SIDE_COLUMNS)
    width = len(side)
    print(f"\n{'':>5}  {STOCK:^{width}}  | {PLUGINS:^{width}} {'':>7}", file=out)
    print(f"{'step':>5}  {side}  | {side} {'skipped':>7}", file=out)
    stock_by_step = {record["step"]: record for record in stock.records}
    plugin_by_step = {record["step"]: record for record in plugins.records}
    for step in sorted(stock_by_step.keys() | plugin_by_step.keys()):
        left, right = stock_by_step.get(step, {}), plugin_by_step.get(step, {})
        skipped = right.get("vlm_dpo/skipped_steps")
        skipped_cell = f"{int(skipped):>7}" if skipped is not None and math.isfinite(skipped) else f"{'-':>7}"
        print(f"{step:>5}  {_side(left)}  | {_side(right)} {skipped_cell}", file=out)
    if not plugins.records and plugins.error:
        print(f"{'':>5}  {'':>{width}}  | {'(stopped before step 0)':<{width}}", file=out)
    out.flush()


def _side(record: Mapping[str, Any]) -> str:
    return " ".join(_cell(record.get(key)) for _, key in SIDE_COLUMNS)


def _cell(value: Any) -> str:
    if value is None:
        return f"{'-':>{CELL}}"
    value = float(value)
    return f"{value:>{CELL}.4f}" if math.isfinite(value) else f"{value!s:>{CELL}}"


def _print_outcomes(stock: RunResult, plugins: RunResult, out: TextIO) -> None:
    lines = []
    for run in (stock, plugins):
        if run.error:
            lines.append(f"{run.label} raised {run.error}")
    if plugins.findings:
        lines.append(f"{PLUGINS} findings:")
        lines.extend(f"  {finding}" for finding in plugins.findings)
    if lines:
        print("\n" + "\n".join(lines), file=out, flush=True)


def _plot(comparison: ScenarioComparison, path: Path, title: str, out: TextIO) -> Path | None:
    runs = {STOCK: comparison.stock.records, PLUGINS: comparison.plugins.records}
    if not any(runs.values()):
        return None
    try:
        from vlm_dpo_plugins.runlog.plot import plot_runs

        return plot_runs(runs, path, title=f"{comparison.name}: {title}")
    except ImportError as error:
        print(f"(no plot: {error})", file=out)
        return None


def _print_verdict(comparison: ScenarioComparison, out: TextIO) -> None:
    lines = ["", "verdict:", *(f"  - {line}" for line in comparison.verdict), "files:"]
    lines.append(f"  {comparison.stock.metrics_path}")
    lines.append(f"  {comparison.plugins.metrics_path}")
    if comparison.plot_path is not None:
        lines.append(f"  {comparison.plot_path}")
    print("\n".join(lines), file=out, flush=True)


# -- data -------------------------------------------------------------------------------------------


def preference_rows(pairs: int, seed: int) -> list[dict[str, Any]]:
    from vlm_dpo_plugins.tiny import make_preference_examples, trl_conversational_rows

    return trl_conversational_rows(make_preference_examples(pairs, seed=seed))


def image_grounded_rows(pairs: int, seed: int) -> list[dict[str, Any]]:
    """Pairs whose preference only the image decides: each question comes twice, with the answers swapped.

    For a shape and two colours A and B, one row shows an A shape (chosen "A", rejected
    "B") and its twin a B shape with the same question (chosen "B", rejected "A"). Text
    alone cannot do better than chance on such pairs; the model has to read the image.
    """
    from vlm_dpo_plugins.tiny.data import COLOURS, QUESTIONS, SHAPES, draw_shape

    rng = random.Random(seed)
    combinations = [(shape, a, b) for shape in SHAPES for a in sorted(COLOURS) for b in sorted(COLOURS) if a < b]
    rows = []
    for shape, first, second in rng.sample(combinations, k=max(1, pairs // 2)):
        question = rng.choice(QUESTIONS).format(shape=shape)
        for right, wrong in ((first, second), (second, first)):
            rows.append(
                {
                    "images": [draw_shape(shape, COLOURS[right])],
                    "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                    "chosen": [
                        {"role": "assistant", "content": [{"type": "text", "text": f"The {shape} is {right}."}]}
                    ],
                    "rejected": [
                        {"role": "assistant", "content": [{"type": "text", "text": f"The {shape} is {wrong}."}]}
                    ],
                }
            )
    return rows


def with_identical_responses(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row's rejected answer replaced by its chosen one, as a column-mapping slip in preprocessing does."""
    return [{**row, "rejected": row["chosen"]} for row in rows]


# -- measuring ----------------------------------------------------------------------------------------


def _tail_mean(values: Sequence[float], fraction: float = 1 / 3) -> float:
    """Mean over the last third of the logged steps: the end of a run, less one batch's noise."""
    if not values:
        return math.nan
    count = max(1, round(len(values) * fraction))
    return statistics.fmean(values[-count:])


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(value) for value in values)


# -- unfrozen-vision ------------------------------------------------------------------------------------

UNFROZEN_PAIRS = 8


def _plan_unfrozen_vision(seed: int, steps: int | None) -> RunPlan:
    return RunPlan(
        rows=image_grounded_rows(UNFROZEN_PAIRS, seed),
        data=f"{UNFROZEN_PAIRS} image-grounded colour pairs (each question twice, answers swapped)",
        steps=steps or 20,
        batch_size=UNFROZEN_PAIRS,  # every step sees every pair: the metrics are the data's, not one batch's
        learning_rate=2e-2,
        notes=(
            "the preference is decided by the image alone; the learning rate is far above real DPO rates so that "
            "20 steps on the tiny model move the vision tower and projector a long way",
        ),
    )


def _judge_unfrozen_vision(stock: RunResult, plugins: RunResult, plan: RunPlan) -> tuple[dict, list[str]]:
    measured = {
        "stock_vision_change": stock.weight_change.get("vision"),
        "stock_projector_change": stock.weight_change.get("projector"),
        "plugin_vision_change": plugins.weight_change.get("vision"),
        "plugin_projector_change": plugins.weight_change.get("projector"),
        "stock_language_change": stock.weight_change.get("language"),
        "plugin_language_change": plugins.weight_change.get("language"),
    }
    for label, run in (("stock", stock), ("plugin", plugins)):
        measured[f"{label}_first_loss"] = run.series("loss")[0] if run.records else math.nan
        measured[f"{label}_final_loss"] = _tail_mean(run.series("loss"))
        measured[f"{label}_final_margin"] = _tail_mean(run.series("rewards/margins"))
        measured[f"{label}_final_accuracy"] = _tail_mean(run.series("rewards/accuracies"))
    tail = max(1, round(len(plugins.records) / 3))
    lines = [
        f"{STOCK} moved the vision tower by {_percent(measured['stock_vision_change'])} and the projector by "
        f"{_percent(measured['stock_projector_change'])} of their norm (relative L2 change); {PLUGINS} moved them "
        f"by {_percent(measured['plugin_vision_change'])} and {_percent(measured['plugin_projector_change'])} "
        "(frozen).",
        f"over the last {tail} steps: {STOCK} loss {measured['stock_final_loss']:.3f} (from "
        f"{measured['stock_first_loss']:.3f}), reward margin {measured['stock_final_margin']:.3f}, accuracy "
        f"{measured['stock_final_accuracy']:.2f}; {PLUGINS} loss {measured['plugin_final_loss']:.3f}, margin "
        f"{measured['plugin_final_margin']:.3f}, accuracy {measured['plugin_final_accuracy']:.2f}.",
    ]
    measured["symptom_reproduced"] = _margin_clearly_larger(
        measured["plugin_final_margin"], measured["stock_final_margin"]
    )
    if measured["symptom_reproduced"]:
        rose = measured["stock_final_loss"] > measured["stock_first_loss"]
        lines.append(
            "reproduced at this seed: with the vision tower and projector trainable the margin stays well below "
            "the frozen run's"
            + (", and stock's loss ended higher than it started" if rose else "")
            + "; the language model alone learned these image-decided pairs better."
        )
    else:
        lines.append(
            "not reproduced at this seed: the margins do not separate clearly, so on this random-weight tiny model "
            "only the weight movement above is shown (other seeds: --seed)."
        )
    return measured, lines


def _margin_clearly_larger(plugin_margin: float, stock_margin: float) -> bool:
    # Twice the margin and 0.1 above it: one batch's noise on the tiny model stays well below both.
    return plugin_margin > 2 * max(stock_margin, 0.0) and plugin_margin - stock_margin > 0.1


# -- identical-pairs ------------------------------------------------------------------------------------------


def _plan_identical_pairs(seed: int, steps: int | None) -> RunPlan:
    pairs = 8
    return RunPlan(
        rows=with_identical_responses(preference_rows(pairs, seed)),
        data=f"{pairs} synthetic pairs whose rejected answer is a copy of the chosen one",
        steps=steps or 6,
        batch_size=4,
        learning_rate=5e-3,
        notes=("the data bug: rejected = chosen in every row (e.g. both columns mapped to the same field)",),
    )


def _judge_identical_pairs(stock: RunResult, plugins: RunResult, plan: RunPlan) -> tuple[dict, list[str]]:
    losses, margins, norms = stock.series("loss"), stock.series("rewards/margins"), stock.series("grad_norm")
    measured = {
        "stock_steps": stock.steps_trained,
        "stock_max_loss_minus_ln2": max((abs(loss - LN2) for loss in losses), default=math.nan),
        "stock_max_abs_margin": max((abs(margin) for margin in margins), default=math.nan),
        "stock_max_grad_norm": max(norms, default=math.nan),
        "plugin_steps": plugins.steps_trained,
        "plugin_error": plugins.error,
        "plugin_error_rows": plugins.error_rows,
    }
    lines = [
        f"{STOCK} trained all {stock.steps_trained} steps without a word: every loss within "
        f"{measured['stock_max_loss_minus_ln2']:.1e} of ln 2 = {LN2:.4f}, reward margins at most "
        f"{measured['stock_max_abs_margin']:.1e}, gradient norm at most {measured['stock_max_grad_norm']:.1e}: "
        "identical responses leave DPO nothing to learn from.",
    ]
    if plugins.error and plugins.steps_trained == 0:
        lines.append(
            f"{PLUGINS} stopped before step 0 naming rows {plugins.error_rows} (collation policy identical-pair: "
            "error, the default; 'skip' would leave such rows out and train on the rest)."
        )
    else:
        lines.append(f"{PLUGINS} trained {plugins.steps_trained} steps (error: {plugins.error or 'none'}).")
    return measured, lines


# -- bf16-overflow ----------------------------------------------------------------------------------------------


def _plan_bf16_overflow(seed: int, steps: int | None) -> RunPlan:
    steps = steps or 10
    inject = min(3, steps - 1)
    return RunPlan(
        rows=preference_rows(16, seed),
        data="16 synthetic image-preference pairs",
        steps=steps,
        batch_size=8,
        learning_rate=5e-3,
        inject_at_step=inject,
        notes=(
            f"injected in both runs: an Inf in one gradient ({INJECTED_PARAMETER}) just before the optimizer step of "
            f"step {inject + 1}, which is how a bf16 overflow reaches the optimizer",
        ),
    )


def _judge_bf16_overflow(stock: RunResult, plugins: RunResult, plan: RunPlan) -> tuple[dict, list[str]]:
    injected = plan.inject_at_step + 1  # logged step numbers count from 1
    stock_after = [r for r in stock.records if r["step"] > injected]
    plugin_after = [r for r in plugins.records if r["step"] > injected]
    stock_margins_after = [float(r.get("rewards/margins", math.nan)) for r in stock_after]
    stock_losses_after = [float(r.get("loss", math.nan)) for r in stock_after]
    measured = {
        "injected_step": injected,
        "stock_non_finite_weights": stock.non_finite_weights,
        "stock_total_weights": stock.total_weights,
        "stock_losses_after": stock_losses_after,
        "stock_margins_after_all_nan": bool(stock_after) and all(math.isnan(m) for m in stock_margins_after),
        "plugin_non_finite_weights": plugins.non_finite_weights,
        "plugin_losses_after_finite": bool(plugin_after) and _finite([float(r["loss"]) for r in plugin_after]),
        "plugin_skipped_steps": plugins.skipped_steps,
        "plugin_first_loss": plugins.series("loss")[0] if plugins.records else math.nan,
        "plugin_last_loss": plugins.series("loss")[-1] if plugins.records else math.nan,
    }
    shown_losses = sorted({"nan" if math.isnan(loss) else f"{loss:g}" for loss in stock_losses_after})
    lines = [
        f"{STOCK} applied the step: {stock.non_finite_weights:,} of {stock.total_weights:,} weights are NaN/Inf at "
        f"the end; after step {injected} every reward margin is NaN and the logged loss reads "
        f"{', '.join(shown_losses)} (the Trainer's logging_nan_inf_filter replaces a NaN loss in the log, so the "
        "loss column can look harmless while the model is gone).",
        f"{PLUGINS} skipped step {injected} (vlm_dpo/skipped_steps = {plugins.skipped_steps}), leaving weights and "
        f"optimizer state untouched; every later loss is "
        + ("finite" if measured["plugin_losses_after_finite"] else "NOT finite")
        + f", {plugins.non_finite_weights} weights are non-finite, and the loss went "
        f"{measured['plugin_first_loss']:.4f} -> {measured['plugin_last_loss']:.4f}.",
    ]
    return measured, lines


# -- lora-inert ------------------------------------------------------------------------------------------------------

INERT_LORA = {"r": 32, "lora_alpha": 1, "lora_dropout": 0.0, "target_modules": LANGUAGE_LORA_TARGETS}


def _plan_lora_inert(seed: int, steps: int | None) -> RunPlan:
    return RunPlan(
        rows=preference_rows(8, seed),
        data="8 synthetic image-preference pairs",
        steps=steps or 12,  # the detector's default lora_inert_steps (10) and two more
        batch_size=4,
        learning_rate=5e-7,
        lora=INERT_LORA,
        notes=(
            f"LoRA r={INERT_LORA['r']}, lora_alpha={INERT_LORA['lora_alpha']} on the language model's linear layers, "
            "with a full-fine-tuning learning rate: settings copied from a full DPO recipe",
        ),
    )


def _judge_lora_inert(stock: RunResult, plugins: RunResult, plan: RunPlan) -> tuple[dict, list[str]]:
    rewards = [abs(v) for key in ("rewards/chosen", "rewards/rejected") for v in stock.series(key)]
    inert = [finding for finding in plugins.findings or [] if finding.code == "lora-inert"]
    measured = {
        "stock_steps": stock.steps_trained,
        "stock_max_loss_minus_ln2": max((abs(v - LN2) for v in stock.series("loss")), default=math.nan),
        "stock_max_abs_reward": max(rewards, default=math.nan),
        "stock_adapter_update": stock.lora_update,
        "plugin_adapter_update": plugins.lora_update,
        "lora_scaling": plan.lora["lora_alpha"] / plan.lora["r"],
        "learning_rate": plan.learning_rate,
        "plugin_lora_inert_findings": len(inert),
        "plugin_error": plugins.error,
    }
    update = measured["stock_adapter_update"]
    lines = [
        f"{STOCK} trained {stock.steps_trained} steps with the loss within {measured['stock_max_loss_minus_ln2']:.1e} "
        f"of ln 2 and the largest |reward| {measured['stock_max_abs_reward']:.1e}, and said nothing; its adapters "
        f"changed the weights by {update:.1e} of their norm (median ||scaling*B@A||/||W||)."
        if update is not None
        else f"{STOCK} trained {stock.steps_trained} steps; no LoRA layers were found to measure.",
    ]
    if inert:
        lines.append(
            f"{PLUGINS} trained the same way and reported lora-inert, naming the scaling alpha/r = "
            f"{measured['lora_scaling']:.3g}, r = {plan.lora['r']} and the learning rate {plan.learning_rate:g}: "
            f"{inert[0].fix}."
        )
    else:
        lines.append(f"{PLUGINS} reported no lora-inert finding (error: {plugins.error or 'none'}).")
    return measured, lines


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            name="unfrozen-vision",
            title="vision tower and projector left trainable",
            failure="LLaVA DPO: loss rises, reward accuracy ~0.5, chosen and rejected rewards move together",
            fix="freeze the vision tower and projector (the freeze policy's default: only the language model trains)",
            plan=_plan_unfrozen_vision,
            judge=_judge_unfrozen_vision,
        ),
        Scenario(
            name="identical-pairs",
            title="chosen and rejected identical after tokenization",
            failure="DPO loss stuck at 0.6931 (ln 2), rewards and margins 0, nothing trains",
            fix="the collation checks stop before step 0 naming the rows (or skip them: identical-pair: skip)",
            plan=_plan_identical_pairs,
            judge=_judge_identical_pairs,
        ),
        Scenario(
            name="bf16-overflow",
            title="a non-finite gradient reaches the optimizer",
            failure="bf16 DPO turns NaN: one overflow and every later loss and weight is NaN",
            fix="the guards skip a non-finite step on every rank without touching weights or optimizer state",
            plan=_plan_bf16_overflow,
            judge=_judge_bf16_overflow,
        ),
        Scenario(
            name="lora-inert",
            title="a LoRA adapter too weak to change the model",
            failure="LoRA DPO 'does nothing': loss stays at ln 2, rewards stay 0, no error",
            fix="the lora-inert detector names alpha/r, r and the learning rate, and what to set instead",
            plan=_plan_lora_inert,
            judge=_judge_lora_inert,
        ),
    )
}
