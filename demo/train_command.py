"""``vlm-dpo train``: the main job, on the embedded tiny VLM by default or on a real model and dataset.

With no options it DPO-trains the tiny LLaVA on the bundled synthetic image
preferences on CPU in seconds, so a newcomer sees the plugins at work at once.
``--model`` and ``--data`` train a real model with the same ``VLMDPOTrainer``, on the
GPU when there is one. Either way it prints a per-step table and a summary of what
the plugins did, and writes ``metrics.jsonl`` and ``training.png`` to the output dir.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

TINY_DEFAULTS = {"steps": 12, "pairs": 16, "batch_size": 8, "learning_rate": 5e-3}
REAL_DEFAULTS = {"steps": -1, "batch_size": 2, "learning_rate": 5e-7, "lora_learning_rate": 1e-4}
PROGRESS_BAR_FROM_STEPS = 50


@dataclass
class TrainOptions:
    output_dir: Path = Path("vlm-dpo-demo")
    model: str | None = None
    data: Path | None = None
    images_root: Path | None = None
    config: Path | None = None
    steps: int | None = None
    epochs: float = 1.0
    pairs: int = TINY_DEFAULTS["pairs"]
    batch_size: int | None = None
    gradient_accumulation: int = 1
    learning_rate: float | None = None
    lora_r: int = 0
    max_length: int | None = None
    seed: int = 0
    log_every: int = 1
    device: str | None = None


@dataclass
class TrainResult:
    trainer: Any
    records: list[dict[str, Any]] = field(default_factory=list)
    metrics_path: Path | None = None
    plot_path: Path | None = None


def run_train(options: TrainOptions, out: TextIO | None = None) -> TrainResult:
    out = out or sys.stdout
    if (options.model is None) != (options.data is None):
        from vlm_dpo_plugins.errors import ConfigError

        raise ConfigError("--model and --data go together: a real model needs its preference data, and vice versa")
    tiny = options.model is None
    if tiny:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_frameworks()

    import torch
    import trl
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from vlm_dpo_plugins.adapters.trl.trainer import VLMDPOTrainer
    from vlm_dpo_plugins.demo.recording import ProgressBar, StepRecorder, table_header, table_row

    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = options.device or ("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    dataset, model_path, source = _dataset_and_model(options, output_dir)
    lora = options.lora_r > 0
    learning_rate = options.learning_rate or (
        TINY_DEFAULTS["learning_rate"]
        if tiny
        else REAL_DEFAULTS["lora_learning_rate"]
        if lora
        else REAL_DEFAULTS["learning_rate"]
    )
    steps = options.steps if options.steps is not None else TINY_DEFAULTS["steps"] if tiny else REAL_DEFAULTS["steps"]
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    processor = AutoProcessor.from_pretrained(model_path)
    args = trl.DPOConfig(
        output_dir=str(output_dir / "run"),
        max_steps=steps,
        num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size or (TINY_DEFAULTS if tiny else REAL_DEFAULTS)["batch_size"],
        gradient_accumulation_steps=options.gradient_accumulation,
        learning_rate=learning_rate,
        **({"max_length": options.max_length} if options.max_length else {}),
        logging_steps=options.log_every,
        report_to="none",
        save_strategy="no" if tiny else "steps",
        save_steps=500,
        use_cpu=device == "cpu",
        bf16=bf16,
        gradient_checkpointing=not tiny,
        seed=options.seed,
        disable_tqdm=True,
    )
    peft_config = _lora_config(options.lora_r) if lora else None

    shown = _Printer(out)
    trainer: VLMDPOTrainer | None = None
    recorder = StepRecorder(
        metrics_path=output_dir / "metrics.jsonl",
        on_record=lambda record: shown.line(table_row(record)),
        events=lambda step: trainer.vlm_dpo_events(step) if trainer is not None else [],
    )
    _remove_stale(output_dir / "metrics.jsonl")
    trainer = VLMDPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[recorder],
        vlm_dpo_config=str(options.config) if options.config else None,
    )
    trainer.remove_callback(PrinterCallback)  # the step table replaces its raw dict lines
    trainer.remove_callback(ProgressCallback)
    total_steps = trainer.args.max_steps if trainer.args.max_steps > 0 else None
    if not tiny or (total_steps or 0) >= PROGRESS_BAR_FROM_STEPS:
        bar = ProgressBar()
        trainer.add_callback(bar)
        shown.bar = bar

    print(_headline(source, trainer, steps, device), file=out)
    _print_freeze_report(trainer, out)
    print(table_header(), file=out, flush=True)
    trainer.train()

    result = TrainResult(trainer, recorder.records, output_dir / "metrics.jsonl")
    result.plot_path = _plot(recorder.records, output_dir / "training.png", source, out)
    _print_summary(trainer, result, out)
    return result


# -- set-up --------------------------------------------------------------------


def _dataset_and_model(options: TrainOptions, output_dir: Path) -> tuple[Any, str, str]:
    from datasets import Dataset

    if options.model is None:
        from vlm_dpo_plugins.tiny import build_tiny_llava, make_preference_examples, trl_conversational_rows

        model_dir = build_tiny_llava(output_dir / "tiny-llava", seed=options.seed)
        rows = trl_conversational_rows(make_preference_examples(options.pairs, seed=options.seed))
        return Dataset.from_list(rows), str(model_dir), f"tiny LLaVA, {options.pairs} synthetic image pairs"
    from vlm_dpo_plugins.demo.data import load_preference_dataset

    dataset = load_preference_dataset(options.data, images_root=options.images_root)
    return dataset, options.model, f"{options.model}, {len(dataset)} pairs from {options.data}"


def _lora_config(rank: int) -> Any:
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError("--lora-r needs peft: pip install peft") from error
    # alpha = 2r keeps the adapter's update scale at 2 whatever the rank; target modules come from the
    # freeze policy's hook, which leaves out the frozen vision tower and projector.
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _quiet_frameworks() -> None:
    # transformers 5 renames gradient checkpointing and warns on every step; not the user's concern here.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    # Backend fallbacks and config rewrites are logged as warnings; the step table is the output here.
    transformers_logging.set_verbosity_error()


def _remove_stale(path: Path) -> None:
    # A new run writes a new log; appending to a previous run's records would plot two runs as one.
    if path.exists():
        path.unlink()


# -- output ----------------------------------------------------------------------


class _Printer:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.bar: Any = None

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, self.out)
        else:
            print(text, file=self.out, flush=True)


def _headline(source: str, trainer: Any, steps: int, device: str) -> str:
    parameters = sum(p.numel() for p in trainer.model.parameters())
    length = f"{steps} DPO steps" if steps > 0 else f"{trainer.args.num_train_epochs:g} epoch(s)"
    return (
        f"vlm-dpo: {source}; {parameters:,} parameters; {length} on {device.upper()}; "
        f"loss '{trainer.vlm_dpo_config.loss.type}' (beta {trainer.vlm_dpo_config.loss.beta})"
    )


def _print_freeze_report(trainer: Any, out: TextIO) -> None:
    from vlm_dpo_plugins.freeze.report import trainable_report

    for group, numbers in trainable_report(trainer.vlm_dpo_groups, trainer.model).items():
        if numbers["parameters"]:
            state = "trainable" if numbers["trainable"] else "frozen"
            print(f"  {group:<10} {numbers['parameters']:>12,} parameters  {state}", file=out)


def _plot(records: list[dict], path: Path, title: str, out: TextIO) -> Path | None:
    if not records:
        return None
    try:
        from vlm_dpo_plugins.runlog.plot import plot_runs
    except ImportError:
        return None
    try:
        return plot_runs({"VLMDPOTrainer": records}, path, title=title)
    except ImportError as error:
        print(f"(no plot: {error})", file=out)
        return None


def _print_summary(trainer: Any, result: TrainResult, out: TextIO) -> None:
    guards = trainer.plugins.get_plugin("guards")
    collation = trainer.plugins.get_plugin("collation")
    records = result.records
    lines = ["summary:"]
    frozen = [group for group, names in trainer.vlm_dpo_groups.items() if names and not _any_trainable(trainer, names)]
    lines.append(f"  frozen groups: {', '.join(frozen) or 'none'}")
    if guards is not None:
        lines.append(f"  skipped optimizer steps: {guards.skipped_steps}; loss spikes: {guards.spikes.spikes}")
    if collation is not None:
        summary = collation.summary
        lines.append(
            f"  pairs checked: {summary.rows_checked}; rows skipped: {len(summary.skipped_rows)}; "
            f"rows warned: {len(summary.warned_rows)}"
        )
    if records:
        first, last = records[0], records[-1]
        lines.append(
            f"  loss {first.get('loss', math.nan):.4f} -> {last.get('loss', math.nan):.4f}; reward margin "
            f"{first.get('rewards/margins', math.nan):.4f} -> {last.get('rewards/margins', math.nan):.4f}; "
            f"accuracy {last.get('rewards/accuracies', math.nan):.2f} at the last step"
        )
    lines.append(f"  {len(trainer.vlm_dpo_findings)} finding(s)")
    lines.extend(f"    {finding}" for finding in trainer.vlm_dpo_findings)
    lines.append(f"  metrics: {result.metrics_path}")
    if result.plot_path is not None:
        lines.append(f"  plot: {result.plot_path}")
    print("\n".join(lines), file=out, flush=True)


def _any_trainable(trainer: Any, names: list[str]) -> bool:
    parameters = dict(trainer.model.named_parameters())
    return any(parameters[name].requires_grad for name in names if name in parameters)
