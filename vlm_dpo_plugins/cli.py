"""The ``vlm-dpo`` command."""

from __future__ import annotations

import argparse
import sys

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
        from vlm_dpo_plugins.adapters.trl.demo import run_demo
    except ImportError as error:
        print(f"vlm-dpo train needs TRL: pip install 'vlm-dpo-plugins[trl]' ({error})", file=sys.stderr)
        return 2
    run_demo(args.output_dir, steps=args.steps, pairs=args.pairs, seed=args.seed, config_path=args.config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-dpo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    plugins = commands.add_parser("plugins", help="list the registered plugins and the hooks each implements")
    plugins.set_defaults(run=cmd_plugins)
    train = commands.add_parser("train", help="DPO-train the embedded tiny VLM on synthetic data (CPU, seconds)")
    train.add_argument("--output-dir", default="vlm-dpo-demo")
    train.add_argument("--steps", type=int, default=8)
    train.add_argument("--pairs", type=int, default=16)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--config", help="plugins YAML (sections freeze, collation, loss, guards, diagnostics)")
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
