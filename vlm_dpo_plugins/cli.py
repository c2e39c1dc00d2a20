"""The ``vlm-dpo`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm_dpo_plugins.errors import VLMDPOError


def cmd_plugins(args: argparse.Namespace) -> int:
    from vlm_dpo_plugins.manager import create_plugin_manager

    manager = create_plugin_manager()
    for info in manager.list_plugins():
        print(f"{info.name}  ({info.source})")
        for hook in info.hooks:
            print(f"    {hook}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    try:
        from vlm_dpo_plugins.demo.train_command import TrainOptions, run_train
    except ImportError as error:
        print(f"vlm-dpo train needs TRL: pip install 'vlm-dpo-plugins[trl]' ({error})", file=sys.stderr)
        return 2
    if args.scenario:
        from vlm_dpo_plugins.demo.scenarios import run_scenario

        run_scenario(args.scenario, args.output_dir, steps=args.steps, seed=args.seed)
        return 0
    options = TrainOptions(
        output_dir=args.output_dir,
        model=args.model,
        data=args.data,
        images_root=args.images_root,
        config=args.config,
        steps=args.steps,
        epochs=args.epochs,
        pairs=args.pairs,
        batch_size=args.batch_size,
        gradient_accumulation=args.gradient_accumulation,
        learning_rate=args.learning_rate,
        lora_r=args.lora_r,
        max_length=args.max_length,
        seed=args.seed,
        log_every=args.log_every,
        device=args.device,
    )
    run_train(options)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from vlm_dpo_plugins.doctor.command import run_doctor

    return run_doctor(args)


def cmd_report(args: argparse.Namespace) -> int:
    from vlm_dpo_plugins.runlog.report_command import run_report

    return run_report(args)


def cmd_swift_plugin(args: argparse.Namespace) -> int:
    from vlm_dpo_plugins.adapters.swift import plugin_path

    print(plugin_path())
    return 0


def _scenario_names() -> list[str]:
    try:
        from vlm_dpo_plugins.demo.scenarios import SCENARIOS
    except ImportError:  # TRL missing: cmd_train says so
        return []
    return sorted(SCENARIOS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-dpo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    plugins = commands.add_parser("plugins", help="list the registered plugins and the hooks each implements")
    plugins.set_defaults(run=cmd_plugins)
    doctor = commands.add_parser(
        "doctor",
        help="check a preference dataset and/or a training config before training; exit 1 on an error finding",
        description="Preflight, no training: --data runs every row through the pair checks (identical, empty, "
        "whitespace-only differences, image placeholders, missing or unreadable images; with --model and a max "
        "length, truncation); --config lints the training setup against the known causes of failed VLM DPO runs.",
    )
    from vlm_dpo_plugins.doctor.command import add_arguments as add_doctor_arguments

    add_doctor_arguments(doctor)
    doctor.set_defaults(run=cmd_doctor)
    report = commands.add_parser(
        "report",
        help="write an HTML page with plots and findings from a run's logs (TRL, LLaMA-Factory, ms-swift)",
    )
    report.add_argument("run_dir", type=Path, help="the run's output folder")
    report.add_argument(
        "--output", type=Path, help="folder for report.html and the PNGs (default: RUN_DIR/vlm-dpo-report)"
    )
    report.set_defaults(run=cmd_report)
    swift_plugin = commands.add_parser(
        "swift-plugin",
        help='print the plugin file for ms-swift: swift rlhf ... --external_plugins "$(vlm-dpo swift-plugin)"',
    )
    swift_plugin.set_defaults(run=cmd_swift_plugin)
    train = commands.add_parser(
        "train",
        help="DPO-train a VLM with every plugin: the embedded tiny one on synthetic data by default (CPU, seconds)",
        description="Without --model/--data: the embedded tiny LLaVA on synthetic image preferences, on CPU. "
        "With them: your model and JSONL data (docs/data-format.md), on the GPU when there is one. Either way: a "
        "per-step table, a summary of what the plugins did, metrics.jsonl and training.png in --output-dir.",
    )
    train.add_argument("--output-dir", type=Path, default=Path("vlm-dpo-demo"))
    train.add_argument("--model", help="model path or hub id (an image-text-to-text model with its processor)")
    train.add_argument("--data", type=Path, help="preference pairs, JSONL or JSON (docs/data-format.md)")
    train.add_argument("--images-root", type=Path, help="folder relative image paths start from (default: --data's)")
    train.add_argument(
        "--config", type=Path, help="plugins YAML (sections freeze, collation, loss, guards, diagnostics)"
    )
    train.add_argument("--steps", type=int, help="optimizer steps (default: 12 for the tiny model, all epochs else)")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--pairs", type=int, default=16, help="synthetic pairs for the tiny model")
    train.add_argument("--batch-size", type=int, help="pairs per device and step (default: 8 tiny, 2 real)")
    train.add_argument("--gradient-accumulation", type=int, default=1)
    train.add_argument("--learning-rate", type=float, help="default: 5e-3 tiny, 1e-4 with LoRA, 5e-7 full")
    train.add_argument("--lora-r", type=int, default=0, help="train a LoRA adapter of this rank (alpha = 2r)")
    train.add_argument("--max-length", type=int, help="truncate sequences (default: TRL's)")
    train.add_argument("--log-every", type=int, default=1, help="print and record every N steps")
    train.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present for --model runs")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--scenario",
        choices=_scenario_names() or None,
        help="reproduce a known failure on the tiny model, stock trl.DPOTrainer beside VLMDPOTrainer",
    )
    train.set_defaults(run=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except VLMDPOError as error:
        print(f"vlm-dpo: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
