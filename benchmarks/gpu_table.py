"""The GPU table of docs/performance.md, in one run: both released-size presets, bf16, sdpa and flash_attention_2.

    python benchmarks/gpu_table.py                                   # a CUDA machine: measure and write the table
    python benchmarks/gpu_table.py --device cpu --preset-layers 1 --write /tmp/performance.md   # CI's smoke run

For each preset (LLaVA-1.5-7B, Qwen2-VL-2B: the released widths and depths, random weights, built on the device)
and each attention implementation, ``pair_sharing.py``'s arms run on the same weights, data and seed, in
alternating order: stock ``trl.DPOTrainer``, the plugins with sharing off, with the dense mask, with the mask-free
attention (the defaults), and with the reference precomputed; ``flash_pref.FlashDPOTrainer`` is a peer arm where it
imports beside this TRL (0.1.1 pins transformers<4.52, so not beside TRL 1.16: the table then says why).

Every arm trains the language model with plain SGD by default: AdamW's two fp32 moments for LLaVA-1.5-7B's 6.7B
language-model parameters (54 GB) beside the bf16 policy, its gradients and the reference (40 GB) do not fit one
80 GB card, and the step's optimizer share is not what is compared. An arm that cannot run (flash-attn missing,
no CUDA, out of memory) is a row saying so, not a crash.

The table goes between the ``gpu table`` markers of ``--write`` (docs/performance.md by default), with the device,
torch, transformers and the date named; ``--no-write`` prints it only. Keep one run under ~8 minutes on a GPU:
``--steps`` 6 with 2 warm-up steps and 1 repeat per preset and attention is the default.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pair_sharing  # noqa: E402
import torch  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
BEGIN, END = "<!-- gpu table: written by benchmarks/gpu_table.py -->", "<!-- /gpu table -->"
PRESETS = ("llava-1.5-7b", "qwen2-vl-2b")
ATTENTIONS = ("sdpa", "flash_attention_2")
COLUMNS = (
    "preset",
    "attention",
    "arm",
    "step time",
    "× stock",
    "peak memory",
    "× stock",
    "one-off pass",
    "step time, pass over the epochs",
    "× stock",
    "images / pair",
    "max loss diff",
)


def main(argv: list[str] | None = None) -> list[str]:
    options = command_line().parse_args(argv)
    lines = table(options)
    print("\n".join(lines))
    if options.write is not None:
        write_table(options.write, lines)
    return lines


def command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset-layers", type=int, help="this many layers in each stack: a smoke run")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--attention", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--response-words", type=int, default=24)
    parser.add_argument("--optim", default="sgd")
    parser.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 (bf16 on a CPU is slow)")
    parser.add_argument("--write", type=Path, default=DOCS, help="the page whose gpu-table markers get the table")
    parser.add_argument("--no-write", dest="write", action="store_const", const=None)
    return parser


def table(options: argparse.Namespace) -> list[str]:
    lines = [f"Measured on {machine(options.device)}, {datetime.date.today().isoformat()}: {settings(options)}.", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for preset in options.presets:
        for attention in options.attention:
            lines += preset_rows(preset, attention, options)
    return lines


def preset_rows(preset: str, attention: str, options: argparse.Namespace) -> list[str]:
    reason = why_not_runnable(attention, options.device)
    if reason is not None:
        return [not_run(preset, attention, "every arm", reason)]
    arguments = pair_sharing.parser().parse_args(
        [
            "--preset", preset, "--device", options.device, "--attn-implementation", attention,
            "--steps", str(options.steps), "--warmup", str(options.warmup), "--repeats", str(options.repeats),
            "--batch-size", str(options.batch_size), "--response-words", str(options.response_words),
            "--optim", options.optim, "--epochs", "3",
            *(["--preset-layers", str(options.preset_layers)] if options.preset_layers else []),
            *([] if options.fp32 else ["--bf16"]),
        ]
    )  # fmt: skip
    peer_reason = why_flash_pref_cannot_run(attention, options.device)
    arms = pair_sharing.ARMS + (() if peer_reason else (pair_sharing.PEER_ARM,))
    try:
        results = pair_sharing.measure(arguments, arms)
    except torch.OutOfMemoryError as error:
        return [not_run(preset, attention, "every arm", f"out of memory: {str(error).splitlines()[0]}")]
    rows = [measured(preset, attention, row) for row in pair_sharing.summary(results, arguments)]
    if peer_reason:
        rows.append(not_run(preset, attention, pair_sharing.PEER_ARM, peer_reason))
    return rows


def why_not_runnable(attention: str, device: str) -> str | None:
    if attention != "flash_attention_2":
        return None
    if device != "cuda" or not torch.cuda.is_available():
        return "FlashAttention-2 needs a CUDA device"
    from transformers.utils import is_flash_attn_2_available

    return None if is_flash_attn_2_available() else "flash-attn is not installed"


def why_flash_pref_cannot_run(attention: str, device: str) -> str | None:
    if importlib.util.find_spec("flash_pref") is None:
        return "flash-pref is not installed (0.1.1 requires transformers<4.52; TRL 1.16 needs transformers 5)"
    if attention != "flash_attention_2" or device != "cuda":
        return "flash-pref shares prefixes through FlashAttention-2 varlen on CUDA only"
    try:
        import flash_pref  # noqa: F401
    except Exception as error:  # an install against another transformers fails on import, in its own way
        return f"flash-pref does not import here: {type(error).__name__}: {error}"
    return None


def measured(preset: str, attention: str, row: dict) -> str:
    cells = [
        preset,
        attention,
        row["arm"],
        f"{row['step'] * 1000:.0f} ms",
        f"{row['step_ratio']:.2f}",
        f"{row['memory'] / 2**30:.2f} GiB",
        f"{row['memory_ratio']:.2f}",
        f"{row['one_off'] * 1000:.0f} ms",
        f"{row['amortised'] * 1000:.0f} ms",
        f"{row['amortised_ratio']:.2f}",
        f"{row['images']:g}",
        f"{row['loss_diff']:.1e}",
    ]
    return "| " + " | ".join(cells) + " |"


def not_run(preset: str, attention: str, arm: str, reason: str) -> str:
    return "| " + " | ".join([preset, attention, arm, f"not run: {reason}", *[""] * (len(COLUMNS) - 4)]) + " |"


def machine(device: str) -> str:
    versions = f"torch {torch.__version__}, transformers {_version('transformers')}, trl {_version('trl')}"
    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), {versions}"
    return f"CPU {platform.processor() or platform.machine()} (a smoke run, not GPU figures), {versions}"


def settings(options: argparse.Namespace) -> str:
    layers = f"{options.preset_layers} layer(s) per stack" if options.preset_layers else "the released depths"
    dtype = "fp32" if options.fp32 else "bf16"
    return (
        f"{layers}, {dtype}, batch {options.batch_size} pairs, {options.steps} steps ({options.warmup} warm-up) "
        f"x {options.repeats} run(s) per arm, {options.optim}; peak memory is CUDA's max_memory_allocated (on a "
        "CPU: the bytes saved for backward)"
    )


def write_table(page: Path, lines: list[str]) -> None:
    """Replace what stands between the markers; a page without them is an error naming them."""
    text = page.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{page} has no '{BEGIN}' ... '{END}' markers to write the table between")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    page.write_text(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail)


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
