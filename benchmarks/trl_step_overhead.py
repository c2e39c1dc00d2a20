"""Step time of VLMDPOTrainer against stock trl.DPOTrainer, on the same model, data, seed and config.

    python benchmarks/trl_step_overhead.py                     # tiny LLaVA on CPU
    python benchmarks/trl_step_overhead.py --model qwen2_vl --hidden-size 128 --device cuda

Both runs train every parameter group (the plugin run with ``freeze.trainable`` set to all
groups), so they do the same work and the difference is the hooks: collation checks,
the loss hook, the guarded optimizer step, metrics. Runs alternate (stock, plugins,
stock, ...) so that drift in the machine's speed hits both; each step is timed by a
callback from one ``on_step_end`` to the next (batch fetching and collation included);
warm-up steps are dropped; the ratio
is of medians, with the range of per-repeat ratios. The collation pre-scan before
step 0 is reported separately: it is a one-off pass over the dataset, not step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLM_DPO_LOAD_PLUGINS", "none")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402
from vlm_dpo_plugins.adapters.trl import VLMDPOTrainer  # noqa: E402

from vlm_dpo_plugins.tiny import (  # noqa: E402
    build_tiny_llava,
    build_tiny_qwen2_vl,
    make_preference_examples,
    trl_conversational_rows,
)

EVERYTHING_TRAINS = {"freeze": {"trainable": ["vision", "projector", "language"]}}


class StepTimer(TrainerCallback):
    """Time between consecutive step ends: the whole step, batch fetching and collation included."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def one_run(trainer_class, model_dir: Path, rows: list[dict], options: argparse.Namespace, output: Path):
    timer = StepTimer()
    args = trl.DPOConfig(
        output_dir=str(output), max_steps=options.steps, per_device_train_batch_size=options.batch_size,
        learning_rate=1e-4, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=options.device == "cpu", seed=0, disable_tqdm=True,
    )
    kwargs = {"vlm_dpo_config": EVERYTHING_TRAINS} if trainer_class is VLMDPOTrainer else {}
    trainer = trainer_class(
        model=AutoModelForImageTextToText.from_pretrained(model_dir), args=args,
        train_dataset=Dataset.from_list(rows), processing_class=AutoProcessor.from_pretrained(model_dir),
        callbacks=[timer], **kwargs,
    )
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    return timer.times[options.warmup :], total - sum(timer.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("llava", "qwen2_vl"), default="llava")
    parser.add_argument("--hidden-size", type=int, default=32, help="language model width of the tiny model")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    options = parser.parse_args()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()

    work = Path(tempfile.mkdtemp(prefix="vlm-dpo-bench-"))
    build = build_tiny_llava if options.model == "llava" else build_tiny_qwen2_vl
    model_dir = build(work / "model", hidden_size=options.hidden_size)
    rows = trl_conversational_rows(make_preference_examples(options.steps * options.batch_size, seed=0))

    stock_steps: list[float] = []
    plugin_steps: list[float] = []
    ratios: list[float] = []
    outside = {"stock": [], "plugins": []}
    for repeat in range(options.repeats):
        stock, stock_outside = one_run(trl.DPOTrainer, model_dir, rows, options, work / f"stock{repeat}")
        ours, our_outside = one_run(VLMDPOTrainer, model_dir, rows, options, work / f"plugins{repeat}")
        stock_steps += stock
        plugin_steps += ours
        outside["stock"].append(stock_outside)
        outside["plugins"].append(our_outside)
        ratios.append(statistics.median(ours) / statistics.median(stock))

    stock_median, plugin_median = statistics.median(stock_steps), statistics.median(plugin_steps)
    print(f"model: tiny {options.model}, hidden size {options.hidden_size}, batch {options.batch_size} pairs, "
          f"{options.device}; {options.repeats} x {options.steps - options.warmup} timed steps per trainer")
    print(f"stock trl.DPOTrainer   median step {stock_median * 1e3:8.2f} ms")
    print(f"VLMDPOTrainer          median step {plugin_median * 1e3:8.2f} ms")
    print(f"ratio (plugins/stock)  {plugin_median / stock_median:.3f}  "
          f"(per repeat {min(ratios):.3f} .. {max(ratios):.3f})")
    print(f"outside the steps (set-up, pre-scan, end): stock {statistics.median(outside['stock']):.2f} s, "
          f"plugins {statistics.median(outside['plugins']):.2f} s")


if __name__ == "__main__":
    main()
