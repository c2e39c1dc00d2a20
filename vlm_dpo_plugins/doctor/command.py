"""``vlm-dpo doctor``: the data and/or config checks, their report, and an exit code a launch script can gate on."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from vlm_dpo_plugins.types import Severity

EXIT_ERRORS = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="preference pairs: .jsonl or .json (TRL, LLaMA-Factory or ms-swift)")
    parser.add_argument("--images-root", type=Path, help="folder relative image paths start from (default: --data's)")
    parser.add_argument("--model", help="local model folder: its tokenizer/processor measures lengths and image tokens")
    parser.add_argument("--max-length", type=int, help="truncation length (default: the config's, when --config)")
    parser.add_argument(
        "--config", type=Path, help="a LLaMA-Factory YAML, an ms-swift argument list/JSON, or a TRL DPOConfig YAML"
    )
    parser.add_argument("--framework", choices=("llamafactory", "swift", "trl"), help="default: told from the keys")
    parser.add_argument("--workers", type=int, help="threads for the image checks (default: 4 per core, <= 32)")
    parser.add_argument("--json", action="store_true", help="write one JSON document to stdout instead of text")
    parser.add_argument("--all", action="store_true", help="print every finding (default: the first 50)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def run_doctor(args: argparse.Namespace) -> int:
    from vlm_dpo_plugins.doctor.render import (
        json_document,
        print_data_report,
        print_setup_report,
        print_verdict,
    )
    from vlm_dpo_plugins.errors import ConfigError

    if args.data is None and args.config is None:
        raise ConfigError("vlm-dpo doctor needs --data FILE, --config FILE, or both")
    setup = None
    setup_findings = []
    max_length = args.max_length
    model = args.model
    if args.config is not None:
        from vlm_dpo_plugins.doctor.rules import hidden_size_of, lint
        from vlm_dpo_plugins.doctor.setup import read_setup

        setup = read_setup(args.config, args.framework)
        setup_findings = lint(setup, hidden_size_of(model or setup.model))
        max_length = max_length or _config_max_length(setup.raw)
    data = None
    if args.data is not None:
        from vlm_dpo_plugins.doctor.data import check_data

        progress = None if (args.no_progress or args.json or not sys.stderr.isatty()) else _progress_bars()
        data = check_data(
            args.data,
            images_root=args.images_root,
            model=model,
            max_length=max_length,
            workers=args.workers,
            progress=progress,
        )
    findings = (data.findings if data else []) + setup_findings
    if args.json:
        print(json_document(data, setup, setup_findings))
    else:
        limit = None if args.all else 50
        if data is not None:
            print_data_report(data, sys.stdout, limit)
        if setup is not None:
            print_setup_report(setup, setup_findings, sys.stdout)
        print_verdict(findings, sys.stdout)
    return EXIT_ERRORS if any(f.severity is Severity.ERROR for f in findings) else 0


def _config_max_length(raw: dict) -> int | None:
    for key in ("max_length", "cutoff_len"):
        value = raw.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _progress_bars() -> Callable[[str, int | None], Callable[[int], None]] | None:
    try:
        from tqdm import tqdm
    except ImportError:
        return None

    def bar(label: str, total: int | None) -> Callable[[int], None]:
        return tqdm(total=total, desc=label, unit=" " + label, leave=False, file=sys.stderr).update

    return bar
