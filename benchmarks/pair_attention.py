"""The packed pairs' attention alone: two causal SDPA calls per row against one SDPA call with the dense 4D mask.

    python benchmarks/pair_attention.py                       # CPU, T = 1k, 4k, 8k
    python benchmarks/pair_attention.py --device cuda --dtype bfloat16

Each length T is one packed row per pair, laid out as a VLM's pairs are: a prompt of 70% of the row (image
tokens mostly), then the chosen and the rejected branch of 15% each. Both arms take the same queries, keys and
values (grouped-query attention, 28 query and 4 key heads of 128, Qwen2-VL-7B's), run forward and backward, and
alternate, so drift on a shared machine falls on both. Memory: on CUDA the peak allocated during the call above
what the inputs hold; on CPU the dense arm's mask alone (CPU keeps no allocator statistics), which the mask-free
arm does not build at all.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vlm_dpo_plugins.sharing.packing import CHOSEN, REJECTED, SHARED, pack_pairs
from vlm_dpo_plugins.sharing.prefix_attention import PairLayout, pair_attention


def packed_rows(length: int, pairs: int, device: str):
    prompt, response = int(length * 0.7), (length - int(length * 0.7)) // 2
    ids = torch.arange(2 * pairs * (prompt + response)).reshape(2 * pairs, prompt + response) % 1000 + 1
    ids[pairs:, :prompt] = ids[:pairs, :prompt]
    ones = torch.ones_like(ids)
    responses = torch.zeros_like(ids)
    responses[:, prompt:] = 1
    packed = pack_pairs(ids, ones, responses)
    return packed, PairLayout.of(packed.side, SHARED, CHOSEN, REJECTED)


def dense(query, key, value, mask):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask).transpose(1, 2)


def timed(run, device: str) -> tuple[float, int]:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - started, torch.cuda.max_memory_allocated() - before
    return time.perf_counter() - started, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lengths", default="1024,4096,8192")
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--key-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"device {args.device}, {args.dtype}, {args.pairs} pair(s), {args.heads}/{args.key_heads} heads x "
          f"{args.head_dim}, forward + backward, median of {args.repeats}")  # fmt: skip
    print("| T | dense mask: time | mask-free: time | x dense | dense: mask bytes | dense: peak | mask-free: peak |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for length in (int(value) for value in args.lengths.split(",")):
        packed, layout = packed_rows(length, args.pairs, args.device)
        generator = torch.Generator().manual_seed(0)

        def tensor(heads):
            shape = (args.pairs, heads, packed.length, args.head_dim)
            return torch.randn(shape, generator=generator).to(args.device, dtype).requires_grad_()

        query, key, value = tensor(args.heads), tensor(args.key_heads), tensor(args.key_heads)
        upstream = torch.randn((args.pairs, packed.length, args.heads, args.head_dim), generator=generator)
        upstream = upstream.to(args.device, dtype)

        def dense_step():
            mask = packed.visible().to(args.device)
            dense(query, key, value, mask).backward(upstream)

        def free_step():
            pair_attention(query, key, value, layout).backward(upstream)

        times: dict[str, list[float]] = {"dense": [], "free": []}
        peaks: dict[str, int] = {"dense": 0, "free": 0}
        for _ in range(args.repeats):
            for name, step in (("dense", dense_step), ("free", free_step)):
                seconds, peak = timed(step, args.device)
                times[name].append(seconds)
                peaks[name] = max(peaks[name], peak)
        dense_time, free_time = statistics.median(times["dense"]), statistics.median(times["free"])
        mask_bytes = args.pairs * packed.length * packed.length  # bool
        peak = (lambda n: f"{peaks[n] / 2**20:.1f} MiB" if args.device == "cuda" else "n/a")  # noqa: E731
        print(
            f"| {packed.length} | {dense_time * 1e3:.1f} ms | {free_time * 1e3:.1f} ms | {free_time / dense_time:.2f} "
            f"| {mask_bytes / 2**20:.1f} MiB | {peak('dense')} | {peak('free')} |"
        )


if __name__ == "__main__":
    main()
