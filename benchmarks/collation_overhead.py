"""How much the collation checks add to TRL's own collation, per batch, on the tiny LLaVA and Qwen2-VL.

    python benchmarks/collation_overhead.py [--batches 40] [--batch-size 8]

For each model it times ``DataCollatorForVisionPreference`` alone and the same
collator called through ``vlm_dpo_collate`` (raw-row image checks, pair
conversion, every pair check, the policy), alternating the two so machine noise
hits both alike. The time the checks add is also measured directly, inside each
checked call, as the call's time minus the time spent in TRL's collator: on a
shared machine the collator's own run-to-run noise is larger than the checks, so
the ratio printed is (TRL alone + added) / TRL alone from medians. A clean batch
is collated once; a batch with a skipped pair is collated again without it, so
that case is timed separately.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class TimedCollator:
    """The framework's collator, recording the time spent inside it; attributes fall through to it."""

    def __init__(self, collate) -> None:
        self.collate = collate
        self.inside = 0.0

    def __call__(self, examples):
        start = time.perf_counter()
        try:
            return self.collate(examples)
        finally:
            self.inside += time.perf_counter() - start

    def __getattr__(self, name):
        if name == "collate":
            raise AttributeError(name)
        return getattr(self.collate, name)


def timed_ms(function, examples) -> float:
    batch = [dict(example) for example in examples]
    start = time.perf_counter()
    function(batch)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import logging

    from transformers import AutoProcessor
    from transformers.utils import logging as transformers_logging
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from vlm_dpo_plugins.collation.checks import check_example_images
    from vlm_dpo_plugins.manager import create_plugin_manager
    from vlm_dpo_plugins.tiny import (
        build_tiny_llava,
        build_tiny_qwen2_vl,
        make_preference_examples,
        trl_conversational_rows,
    )

    transformers_logging.set_verbosity_error()
    logging.getLogger("vlm_dpo_plugins.collation").setLevel(logging.ERROR)  # the skip case logs its row once
    workdir = Path(tempfile.mkdtemp(prefix="collation-bench-"))
    print(f"batch of {args.batch_size} pairs, medians over {args.batches} batches, {os.cpu_count()} CPU core(s)")
    print(f"{'model':<13}{'tokens':>7}{'TRL alone':>11}{'checked':>10}{'added':>9}{'ratio':>7}{'1 skipped':>11}")
    cases = (  # name, builder, processor overrides, image side in pixels
        ("llava", build_tiny_llava, {}, 56),
        ("qwen2-vl", build_tiny_qwen2_vl, {}, 56),
        # Qwen's pixel budget raised to 448 px: 256 image tokens per image, closer to a real prompt's length.
        ("qwen2-vl-448", build_tiny_qwen2_vl, {"min_pixels": 448 * 448, "max_pixels": 448 * 448}, 448),
    )
    for name, build, overrides, side in cases:
        processor = AutoProcessor.from_pretrained(build(workdir / name), **overrides)
        examples = trl_conversational_rows(make_preference_examples(args.batch_size, seed=0))
        for example in examples:
            example["images"] = [image.resize((side, side)) for image in example["images"]]
        with_identical = [dict(example) for example in examples]
        with_identical[1] = dict(with_identical[1], rejected=with_identical[1]["chosen"])
        collator = DataCollatorForVisionPreference(processor)
        timed = TimedCollator(collator)
        managers = {}
        for policy in ("error", "skip"):
            managers[policy] = create_plugin_manager(load_entry_points=False)
            managers[policy].hook.vlm_dpo_configure(config=managers[policy].load_config(
                {"collation": {"policy": {"identical-pair": policy},
                               "report_path": str(workdir / f"{name}-{policy}.jsonl")}}
            ))

        def checked(batch, manager=managers["error"], collate=timed):
            return manager.hook.vlm_dpo_collate(examples=batch, collate=collate)

        def checked_with_skip(batch, manager=managers["skip"], collate=collator):
            return manager.hook.vlm_dpo_collate(examples=batch, collate=collate)

        for _ in range(3):  # warm-up: processor caches, token facts
            timed_ms(collator, examples)
            timed_ms(checked, examples)
        tokens = collator([dict(example) for example in examples])["input_ids"].shape[1]
        plain, total, added, skipping = [], [], [], []
        for _ in range(args.batches):
            plain.append(timed_ms(collator, examples))
            timed.inside = 0.0
            total.append(timed_ms(checked, examples))
            added.append(total[-1] - timed.inside * 1000)
        for _ in range(max(5, args.batches // 4)):
            skipping.append(timed_ms(checked_with_skip, with_identical))
        plain_ms, added_ms = statistics.median(plain), statistics.median(added)
        print(f"{name:<13}{tokens:>7}{plain_ms:>9.2f}ms{statistics.median(total):>8.2f}ms{added_ms:>7.2f}ms"
              f"{(plain_ms + added_ms) / plain_ms:>7.3f}{statistics.median(skipping):>9.2f}ms")

    from PIL import Image

    photo = workdir / "photo.png"
    Image.effect_noise((448, 448), 64).convert("RGB").save(photo)
    verify_ms = statistics.median(
        timed_ms(lambda _: check_example_images({"image": str(photo)}, 0), []) for _ in range(50)
    )
    print(f"verify_images, one 448x448 PNG from disk: {verify_ms:.2f}ms (in-memory images are not re-opened)")


if __name__ == "__main__":
    main()
