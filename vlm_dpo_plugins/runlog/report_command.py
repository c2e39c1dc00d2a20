"""``vlm-dpo report RUN_DIR``: the page, its PNGs, and the findings (logged ones plus a replay of the detectors)."""

from __future__ import annotations

import argparse
import sys


def run_report(args: argparse.Namespace) -> int:
    from vlm_dpo_plugins.diagnostics.replay import replay_detectors
    from vlm_dpo_plugins.runlog.report import write_report

    result = write_report(args.run_dir, args.output, extra_findings=replay_detectors)
    print(f"report: {result.html_path}")
    for name, path in result.png_paths.items():
        print(f"  {name}: {path}")
    print(f"  {len(result.findings)} finding(s)", file=sys.stdout)
    return 0
