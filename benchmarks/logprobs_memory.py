"""Peak memory of summed response log-probs (forward + backward): the chunked fp32 helper vs the naive full upcast.

    python benchmarks/logprobs_memory.py                      # B=2 rows, T=2048, V=32000, bf16, CPU or CUDA
    python benchmarks/logprobs_memory.py --rows 4 --vocab 152064 --length 1024

Each method runs in a fresh process. On CUDA the figure is ``torch.cuda.max_memory_allocated`` minus what the
inputs hold; on CPU it is the growth of the process's peak resident set (``ru_maxrss``) over the peak after
the inputs were built (large tensors are mmap'd and returned on free, so RSS follows tensor memory closely).

Methods (inputs: bf16 logits, or bf16 final hidden states + lm_head weight, all requiring grad):
- naive:        logits.float().log_softmax(-1), gather, masked sum (a full fp32 copy plus a full fp32 result)
- chunked:      vlm_dpo_plugins.losses.logprobs.sequence_logps
- naive-hidden: lm_head matmul to full bf16 logits, then naive
- chunked-hidden: sequence_logps_from_hidden (no full logits at all)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METHODS = ("naive", "chunked", "naive-hidden", "chunked-hidden")


def naive_logps(logits, input_ids, response_mask):
    log_probs = logits.float().log_softmax(dim=-1)[:, :-1]
    token_logps = log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * response_mask[:, 1:]).sum(dim=-1)


def inputs(args, device, hidden: bool):
    dtype = DTYPES[args.dtype]
    generator = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(0, args.vocab, (args.rows, args.length), device=device, generator=generator)
    response_mask = torch.zeros(args.rows, args.length, dtype=torch.long, device=device)
    response_mask[:, args.length - args.response :] = 1
    if hidden:  # created directly in the low dtype, so building them leaves no fp32 peak behind
        states = torch.randn(args.rows, args.length, args.hidden, dtype=dtype, device=device, generator=generator)
        weight = torch.randn(args.vocab, args.hidden, dtype=dtype, device=device, generator=generator)
        weight /= args.hidden**0.5
        return (states.requires_grad_(), weight.requires_grad_()), input_ids, response_mask
    logits = torch.randn(args.rows, args.length, args.vocab, dtype=dtype, device=device, generator=generator)
    return (logits.requires_grad_(),), input_ids, response_mask


def run(method, tensors, input_ids, response_mask):
    from vlm_dpo_plugins.losses.logprobs import sequence_logps, sequence_logps_from_hidden

    if method == "naive":
        logps = naive_logps(tensors[0], input_ids, response_mask)
    elif method == "chunked":
        logps = sequence_logps(tensors[0], input_ids, response_mask).logps
    elif method == "naive-hidden":
        logps = naive_logps(tensors[0] @ tensors[1].T, input_ids, response_mask)
    else:
        logps = sequence_logps_from_hidden(tensors[0], tensors[1], input_ids, response_mask).logps
    logps.sum().backward()
    return logps.detach()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    hidden = args.measure.endswith("hidden")
    warmup = argparse.Namespace(**{**vars(args), "rows": 1, "length": 16, "response": 8, "vocab": 64, "hidden": 8})
    run(args.measure, *inputs(warmup, device, hidden))  # load kernels and thread pools before the baseline
    tensors, input_ids, response_mask = inputs(args, device, hidden)
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = peak_rss_bytes()
    start = time.perf_counter()
    logps = run(args.measure, tensors, input_ids, response_mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = peak_rss_bytes() - baseline
    return {
        "method": args.measure,
        "device": device.type,
        "peak_extra_bytes": peak,
        "seconds": time.perf_counter() - start,
        "logps": logps.float().cpu().tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2, help="sequences (a DPO batch has 2 per pair)")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--response", type=int, default=1024, help="response tokens at the end of each row")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size for the *-hidden methods (CPU-sized)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return

    shape = ("rows", "length", "response", "vocab", "hidden", "dtype", "device")
    forwarded = [item for key in shape for item in (f"--{key}", str(getattr(args, key)))]
    results = {}
    for method in args.methods.split(","):
        output = subprocess.run(
            [sys.executable, __file__, *forwarded, "--measure", method], check=True, capture_output=True, text=True
        ).stdout
        results[method] = json.loads(output.splitlines()[-1])

    mib = 2**20
    element = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    print(f"rows={args.rows} length={args.length} response={args.response} vocab={args.vocab} "
          f"hidden={args.hidden} dtype={args.dtype} device={next(iter(results.values()))['device']}")
    print(f"input logits: {args.rows * args.length * args.vocab * element / mib:.0f} MiB; "
          f"one full fp32 copy: {args.rows * args.length * args.vocab * 4 / mib:.0f} MiB")
    print(f"{'method':<16}{'peak above inputs (MiB)':>25}{'seconds':>10}")
    for method, result in results.items():
        print(f"{method:<16}{result['peak_extra_bytes'] / mib:>25.0f}{result['seconds']:>10.2f}")
    if "chunked" in results:
        print(f"(the logits' own gradient, {args.rows * args.length * args.vocab * element / mib:.0f} MiB in "
              f"{args.dtype}, is part of every logits method's peak: autograd hands it on to the lm_head)")
    for naive, chunked in (("naive", "chunked"), ("naive-hidden", "chunked-hidden")):
        if naive in results and chunked in results:
            ratio = results[naive]["peak_extra_bytes"] / max(results[chunked]["peak_extra_bytes"], 1)
            difference = max(
                abs(a - b) / abs(a) for a, b in zip(results[naive]["logps"], results[chunked]["logps"])
            )
            print(f"{naive} / {chunked} peak ratio: {ratio:.1f}x  (largest relative logp difference: {difference:.1e})")


if __name__ == "__main__":
    main()
