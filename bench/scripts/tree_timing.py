"""Time `moekit.fused_experts` of whichever moekit PYTHONPATH holds, on fixed inputs.

For A/Bs against old source trees whose `moekit bench` differs from today's: only the
public `fused_experts(hidden, w13, w2, topk_ids, topk_weights, activation=...)` is used,
which every tree since session 2 has. Inputs follow `moekit.bench.inputs` (weights
N(0, 1/fan_in), tokens N(0, 1), softmax top-k renormalised) but are built here, so every
tree gets the same values. Timing: L2 emptied by a 256 MB read before each call, CUDA
events around the call alone, median of `--reps`. Each cell records its wall-clock
window, so `tree_ab.py` can match it with the SM clocks sampled beside the run.

    PYTHONPATH=<tree>/src python3 bench/scripts/tree_timing.py --out cells.json \
        --presets deepseek-v3 --tokens 4096 16384
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton

PRESETS = {  # name: (experts, top-k, hidden, intermediate), as moekit.bench.presets
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "olmoe-1b-7b": (64, 8, 2048, 1024),
    "deepseek-v2-lite": (64, 6, 2048, 1408),
    "granite-3.0-3b-a800m": (40, 8, 1536, 512),
    "deepseek-v3": (256, 8, 7168, 2048),
}


def _inputs(preset: str, tokens: int, dtype: torch.dtype):
    e, k, h, i = PRESETS[preset]
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    w13 = torch.empty((e, 2 * i, h), dtype=dtype, device="cuda").normal_(0, h**-0.5, generator=gen)
    w2 = torch.empty((e, h, i), dtype=dtype, device="cuda").normal_(0, i**-0.5, generator=gen)
    gen.manual_seed(tokens)
    hidden = torch.empty((tokens, h), dtype=dtype, device="cuda").normal_(0, 1, generator=gen)
    logits = torch.empty((tokens, e), device="cuda").normal_(0, 1, generator=gen)
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return hidden, w13, w2, ids.to(torch.int32), weights


def _time_ms(fn, reps: int) -> list[float]:
    flush = torch.empty(256 * 2**20 // 4, device="cuda")
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        flush.sum()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _matmul_peak(reps: int) -> dict:
    """bf16 8192³ `torch.mm`, timed like the cells: the peak of this process's clocks."""
    a = torch.randn((8192, 8192), dtype=torch.bfloat16, device="cuda")
    b = torch.randn((8192, 8192), dtype=torch.bfloat16, device="cuda")
    begin = time.time()
    times = _time_ms(lambda: a @ b.T, reps)
    median = sorted(times)[len(times) // 2]
    return {"preset": "torch.mm 8192^3", "tokens": 0, "median_ms": median, "times_ms": times,
            "tflops": 2 * 8192**3 / (median * 1e-3) / 1e12, "window_s": [begin, time.time()]}


def _cell(moekit, preset: str, tokens: int, reps: int) -> dict:
    """One preset at `tokens`: the median time, TFLOP/s and the first 64 rows' error."""
    hidden, w13, w2, ids, weights = _inputs(preset, tokens, torch.bfloat16)
    out = moekit.fused_experts(hidden, w13, w2, ids, weights, activation="silu")
    ref = moekit.fused_experts(hidden[:64], w13, w2, ids[:64], weights[:64],
                               activation="silu", backend="reference")
    err = ((out[:64].float() - ref.float()).norm() / ref.float().norm()).item()
    begin = time.time()
    times = _time_ms(lambda: moekit.fused_experts(hidden, w13, w2, ids, weights,
                                                  activation="silu", out=out), reps)
    _, k, h, i = PRESETS[preset]
    median = sorted(times)[len(times) // 2]
    return {"preset": preset, "tokens": tokens, "median_ms": median, "times_ms": times,
            "tflops": 2 * tokens * k * 3 * h * i / (median * 1e-3) / 1e12,
            "rel_err_first64": err, "window_s": [begin, time.time()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["deepseek-v3"], choices=sorted(PRESETS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-peak", action="store_true",
                        help="skip the torch.mm peak (a profiler run that wants moekit alone)")
    args = parser.parse_args()
    import moekit

    cells = [] if args.no_peak else [_matmul_peak(args.reps)]
    for preset in args.presets:
        for tokens in args.tokens:
            cells.append(_cell(moekit, preset, tokens, args.reps))
            c = cells[-1]
            print(f"{preset} M={tokens}: {c['median_ms']:.3f} ms, {c['tflops']:.0f} TFLOP/s, "
                  f"err {c['rel_err_first64']:.1e}", flush=True)
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": triton.__version__, "moekit_file": moekit.__file__,
                   "cells": cells}, f, indent=1)


if __name__ == "__main__":
    main()
