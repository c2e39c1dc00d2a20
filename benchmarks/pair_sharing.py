"""Stock TRL DPO against VLMDPOTrainer with prompt and image sharing, on image-heavy VLM preference data.

    python benchmarks/pair_sharing.py                          # tiny LLaVA-1.5 shape on CPU: 576 image tokens
    python benchmarks/pair_sharing.py --image-size 224         # 256 image tokens
    python benchmarks/pair_sharing.py --model qwen2_vl         # 448 x 448 images: 256 merged image tokens
    python benchmarks/pair_sharing.py --steps 12 --repeats 3
    python benchmarks/pair_sharing.py --device cuda --bf16 --preset llava-1.5-7b   # real widths, random weights
    python benchmarks/pair_sharing.py --device cuda --bf16 --preset qwen2-vl-2b

What is compared, on the same model weights, data, seed and trainable parameters (the language model;
the vision tower and projector are frozen in every arm, by hand for stock TRL, by the freeze policy
for the plugins, so the backward does the same work):

- ``stock``: ``trl.DPOTrainer``: two rows per pair, policy and reference each encode every image twice.
- ``plugins, no sharing``: ``VLMDPOTrainer`` with ``sharing.prompt`` and ``sharing.vision_features`` off:
  what the plugins cost without sharing.
- ``plugins``: ``VLMDPOTrainer`` with the defaults (one packed row per pair, one vision encode per pair).
- ``plugins + precompute``: the defaults and ``sharing.reference: precompute``: the reference scores the
  training set once before step 0 (timed apart, as the one-off pass) and is then released; the steps run the
  policy alone.

Runs alternate stock, sharing-off, plugins, plugins, sharing-off, stock, ... so a drift in the
machine's speed costs every arm the same; the first ``--warmup`` steps of each run are dropped.

Printed per arm: median step time (``on_step_begin`` to ``on_step_end``: forwards, backward,
optimizer) and its ratio to stock; peak memory and its ratio (CUDA: ``max_memory_allocated`` over
the step; CPU, which keeps no allocator statistics: the activation memory, the bytes of the distinct
buffers saved for backward during the step, weights left out); images through the vision
tower per pair per step; tokens the language model reads per pair in the policy pass (padding
included); the weights resident during the steps (policy and reference); the one-off pass and the step
time with it spread over ``--epochs`` epochs of the timed steps; and the largest difference of the logged
loss from stock's over the run.
"""

from __future__ import annotations

import argparse
import copy
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
from transformers import AutoModelForImageTextToText, AutoProcessor, PrinterCallback, TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from vlm_dpo_plugins.adapters.trl import VLMDPOTrainer  # noqa: E402

from vlm_dpo_plugins.tiny import make_preference_examples, trl_conversational_rows  # noqa: E402
from vlm_dpo_plugins.tiny.llava import build_tiny_llava  # noqa: E402
from vlm_dpo_plugins.tiny.qwen2_vl import build_tiny_qwen2_vl  # noqa: E402

ARMS = ("stock", "plugins, no sharing", "plugins, dense mask", "plugins", "plugins + precompute")
"""``plugins``: the defaults (with sdpa or flash attention: packed rows without a mask); ``plugins, dense mask``:
``sharing.attention: dense``, the packed rows under a 4D mask."""
PEER_ARM = "flash-pref"
"""``flash_pref.FlashDPOTrainer`` (prefix sharing for text models, FlashAttention-2 varlen), a drop-in for
``trl.DPOTrainer``: run as a peer arm by ``gpu_table.py`` where it imports beside this TRL."""

PRESETS = {
    # Widths and depths of the released checkpoints; the vocabulary stays the tiny tokenizer's (LLaVA ~500 ids,
    # Qwen2-VL its real 151,936 rows), which changes only the LM head, where the fused head scores responses alone.
    "llava-1.5-7b": (
        "llava",
        336,
        {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
        {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
        },
    ),
    "qwen2-vl-2b": (
        "qwen2_vl",
        448,
        {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "hidden_size": 1536},
        {
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        },
    ),
}


def preset_model(
    model_dir: Path, preset: str, layers: int | None, dtype: torch.dtype, device: str, attention: str = "sdpa"
):
    """A random-weight model with the preset's widths, built on ``device`` (``layers`` cuts both stacks for a try)."""
    from transformers import AutoConfig

    _, _, vision, text = PRESETS[preset]
    config = AutoConfig.from_pretrained(model_dir)
    vision, text = dict(vision), dict(text)
    if layers is not None:
        vision["depth" if "depth" in vision else "num_hidden_layers"] = layers
        text["num_hidden_layers"] = layers
    for key, value in vision.items():
        setattr(config.vision_config, key, value)
    text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]  # stored at the tiny width otherwise
    for key, value in text.items():
        setattr(config.text_config, key, value)
    if getattr(config.text_config, "layer_types", None):  # one entry per layer, stored at the tiny depth
        config.text_config.layer_types = [config.text_config.layer_types[0]] * text["num_hidden_layers"]
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attention)


def preference_rows(count: int, response_words: int) -> list[dict]:
    """Image pairs whose responses run to ``response_words`` words (~32-64 tokens with the tiny tokenizer)."""
    rows = trl_conversational_rows(make_preference_examples(count, seed=5))
    for index, row in enumerate(rows):
        for side, extra in (("chosen", index % 3), ("rejected", (index + 1) % 3)):
            text = row[side][0]["content"][0]["text"]
            words = (text + " ") * (response_words // len(text.split()) + extra)
            row[side][0]["content"][0]["text"] = " ".join(words.split()[: response_words + 4 * extra])
    return rows


class StepProbe(TrainerCallback):
    """Step times, peak memory, vision-tower images and language-model tokens, per optimizer step."""

    def __init__(self, trainer, device: str, pairs: int):
        model, reference_model = trainer.model, trainer.ref_model
        self.trainer, self.device, self.pairs = trainer, device, pairs
        self.times, self.memory, self.images, self.tokens, self.resident = [], [], [], [], []
        self._images = self._tokens = self._saved = 0
        self._seen: set[int] = set()
        # Weights saved for backward (every linear layer saves its own) exist anyway: not activation memory.
        self._weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        for each in (model, reference_model):
            if each is not None:
                tower = getattr(each.model, "vision_tower", None) or each.model.visual
                tower.register_forward_pre_hook(self._count_images, with_kwargs=True)
        model.model.language_model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)

    def _count_images(self, module, args, kwargs):
        grid = kwargs.get("grid_thw")  # Qwen2-VL: one row per image; LLaVA: one pixel tensor per image
        self._images += int(grid.shape[0] if grid is not None else args[0].shape[0])

    def _count_tokens(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if torch.is_grad_enabled():  # the policy pass; the reference pass runs under no_grad
            self._tokens += int(embeds.shape[0] * embeds.shape[1])

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._weights and pointer not in self._seen:  # each buffer once, however often saved
            self._seen.add(pointer)
            self._saved += storage.nbytes()
        return tensor

    def on_step_begin(self, args, state, control, **kwargs):
        self._images = self._tokens = self._saved = 0
        self._seen = set()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)
        self._hooks.__exit__(None, None, None)
        peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else self._saved
        self.memory.append(peak)
        self.images.append(self._images / self.pairs)
        self.tokens.append(self._tokens / self.pairs)
        models = (self.trainer.model, self.trainer.ref_model)
        self.resident.append(sum(p.numel() * p.element_size() for m in models if m is not None for p in m.parameters()))


def run_arm(arm: str, model_dir: Path, rows: list[dict], args, output_dir: str):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    reference = None
    if args.preset:
        # Too large to save and reload per arm: the same seed gives every arm the same weights, and the
        # reference is a copy (TRL would otherwise load it from the folder, with the tiny widths).
        model = preset_model(model_dir, args.preset, args.preset_layers, dtype, args.device, args.attn_implementation)
        reference = copy.deepcopy(model)
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=args.attn_implementation
        ).to(args.device)
    config = trl.DPOConfig(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-5,
        **({"optim": args.optim} if args.optim else {}),
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        seed=0,
        disable_tqdm=True,
        max_length=None,
    )
    kwargs = dict(
        model=model,
        ref_model=reference,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoProcessor.from_pretrained(model_dir),
    )
    if arm in ("stock", PEER_ARM):
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(".language_model." in f".{name}" or name.startswith("lm_head"))
        if arm == PEER_ARM:
            from flash_pref import FlashDPOTrainer

            trainer = FlashDPOTrainer(**kwargs)
        else:
            trainer = trl.DPOTrainer(**kwargs)
    else:
        sharing = {
            "plugins, no sharing": {"prompt": False, "vision_features": False},
            "plugins, dense mask": {"attention": "dense"},
            # A fresh cache folder per run: every run times the whole pass.
            "plugins + precompute": {"reference": "precompute", "reference_cache": tempfile.mkdtemp(dir=output_dir)},
        }.get(arm, {})
        trainer = VLMDPOTrainer(**kwargs, vlm_dpo_config={"sharing": sharing, "diagnostics": {"enabled": False}})
    del kwargs, reference  # the trainer holds the reference alone, so releasing it frees it
    trainer.remove_callback(PrinterCallback)
    probe = StepProbe(trainer, args.device, args.batch_size)
    trainer.add_callback(probe)
    passes = []
    if arm == "plugins + precompute":
        precompute = trainer.vlm_dpo_precompute_reference

        def timed_pass():
            started = time.perf_counter()
            precompute()
            passes.append(time.perf_counter() - started)

        trainer.vlm_dpo_precompute_reference = timed_pass
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    warm = slice(args.warmup, None)
    return {
        "times": probe.times[warm],
        "memory": probe.memory[warm],
        "images": probe.images[warm],
        "tokens": probe.tokens[warm],
        "resident": probe.resident[warm],
        "pass": passes,
        "losses": losses,
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("llava", "qwen2_vl"), default="llava")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--image-size", type=int, default=None, help="pixels a side; LLaVA 336: 576 image tokens, Qwen2-VL 448: 256"
    )
    parser.add_argument("--response-words", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="spread the one-off pass over this many epochs")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument(
        "--attn-implementation",
        default="sdpa",
        help="sdpa, flash_attention_2 (needs flash-attn and CUDA; the dense-mask arm then runs two rows), eager",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the released model's widths, random weights")
    parser.add_argument("--preset-layers", type=int, help="with --preset: this many layers in each stack (a try run)")
    parser.add_argument(
        "--optim", help="TRL's optim (default: TRL's); sgd keeps a 7B full fine-tune and its reference in 80 GB"
    )
    return parser


def main() -> None:
    args = parser().parse_args()
    report(measure(args), args)


def measure(args, arms: tuple[str, ...] = ARMS) -> dict[str, list[dict]]:
    """Every arm ``args.repeats`` times, alternating the order, on one model folder and one set of rows."""
    if args.preset:
        args.model, args.image_size = PRESETS[args.preset][:2]
    hf_logging.set_verbosity_error()

    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as root:
        if args.model == "llava":
            args.image_size = args.image_size or 336
            args.image_tokens = (args.image_size // 14) ** 2
            model_dir = build_tiny_llava(
                Path(root) / "model", hidden_size=args.hidden_size, image_size=args.image_size, layers=args.layers
            )
        else:
            args.image_size = args.image_size or 448
            args.image_tokens = (args.image_size // 28) ** 2
            model_dir = build_tiny_qwen2_vl(
                Path(root) / "model",
                hidden_size=args.hidden_size,
                image_pixels=args.image_size**2,
                layers=args.layers,
            )
        rows = preference_rows(args.batch_size * args.steps, args.response_words)
        for repeat in range(args.repeats):
            order = arms if repeat % 2 == 0 else tuple(reversed(arms))
            for arm in order:
                results[arm].append(run_arm(arm, model_dir, rows, args, os.path.join(root, "out")))
    return results


def _shape(args) -> str:
    if not args.preset:
        return f"hidden {args.hidden_size}, {args.layers} layers"
    layers = f", {args.preset_layers} layers per stack" if args.preset_layers else ""
    return f"released widths{layers}, random weights"


def summary(results: dict[str, list[dict]], args) -> list[dict]:
    """Per arm: medians over every timed step of every run, and their ratios to stock's."""

    def pooled(arm: str, key: str) -> list[float]:
        return [value for run in results[arm] for value in run[key]]

    stock_time = statistics.median(pooled("stock", "times"))
    stock_memory = statistics.median(pooled("stock", "memory"))
    stock_resident = statistics.median(pooled("stock", "resident"))
    stock_losses = results["stock"][0]["losses"]
    steps_per_epoch = args.steps  # the data holds one epoch of steps
    rows = []
    for arm in results:
        step = statistics.median(pooled(arm, "times"))
        memory = statistics.median(pooled(arm, "memory"))
        resident = statistics.median(pooled(arm, "resident"))
        one_off = statistics.median(pooled(arm, "pass")) if pooled(arm, "pass") else 0.0
        amortised = step + one_off / (args.epochs * steps_per_epoch)
        rows.append(
            {
                "arm": arm,
                "step": step,
                "step_ratio": step / stock_time,
                "memory": memory,
                "memory_ratio": memory / stock_memory,
                "resident": resident,
                "resident_ratio": resident / stock_resident,
                "one_off": one_off,
                "amortised": amortised,
                "amortised_ratio": amortised / stock_time,
                "images": statistics.median(pooled(arm, "images")),
                "tokens": statistics.median(pooled(arm, "tokens")),
                "loss_diff": max(abs(a - b) for a, b in zip(results[arm][0]["losses"], stock_losses)),
            }
        )
    return rows


def memory_kind(args) -> str:
    return "peak allocated" if args.device == "cuda" else "saved for backward"


def report(results: dict[str, list[dict]], args) -> None:
    print(
        f"\n{args.preset or args.model}, {_shape(args)}, {args.image_tokens} image "
        f"tokens, batch {args.batch_size} pairs, {args.device}{' bf16' if args.bf16 else ' fp32'}, "
        f"{args.attn_implementation}, "
        f"{args.repeats} runs x {args.steps - args.warmup} timed steps per arm\n"
    )
    header = (
        "| arm | step time (median) | × stock | memory, " + memory_kind(args) + " | × stock | weights resident "
        f"| × stock | one-off pass | step time with the pass over {args.epochs} epochs | × stock "
        "| vision images / pair / step | LM tokens / pair (policy pass) | max abs loss diff vs stock |"
    )
    print(header)
    print("|" + " --- |" * 13)
    for row in summary(results, args):
        print(
            f"| {row['arm']} | {row['step'] * 1000:.0f} ms | {row['step_ratio']:.2f} | {row['memory'] / 2**20:.1f} MiB "
            f"| {row['memory_ratio']:.2f} | {row['resident'] / 2**20:.1f} MiB | {row['resident_ratio']:.2f} "
            f"| {row['one_off'] * 1000:.0f} ms | {row['amortised'] * 1000:.0f} ms | {row['amortised_ratio']:.2f} "
            f"| {row['images']:g} | {row['tokens']:g} | {row['loss_diff']:.1e} |"
        )


if __name__ == "__main__":
    main()
