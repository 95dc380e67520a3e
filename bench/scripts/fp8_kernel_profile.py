"""Per-kernel CUDA time of prefill calls, as JSON: for comparing two versions of the
library on one machine (run this script under each version's PYTHONPATH, alternately).
A cell's scheme is an fp8 scheme (`fp8_tensor`, ...) or `bf16` for the 16-bit layer.

Each cell (preset, M, scheme) times `CALLS` eager calls after three warm-up calls under
torch.profiler, in `--blocks` blocks (no L2 flush between calls), and records each
kernel's CUDA µs per call, one value per block.

    PYTHONPATH=src python3 bench/scripts/fp8_kernel_profile.py --tag new \\
        --cells qwen3-30b-a3b:4096:fp8_tensor --out $OUT
    python3 bench/scripts/fp8_kernel_profile.py --compare $OUT/old.json $OUT/new.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

CALLS = 10


def kernel_blocks_us(call, blocks: int, calls: int = CALLS) -> dict[str, list[float]]:
    """{kernel name: [its CUDA µs per call, one per block]}: `calls` calls of `call` under
    torch.profiler per block, after three warm-up calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    kernels: dict[str, list[float]] = {}
    for _ in range(blocks):
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                call()
            torch.cuda.synchronize()
        for event in prof.key_averages():
            if event.device_time_total > 0:
                kernels.setdefault(event.key, []).append(event.device_time_total / calls)
    return kernels


def profile_cell(name: str, m: int, scheme: str, blocks: int) -> dict:
    """{kernel name: [µs per call, one per block]} of one cell."""
    import torch

    import moekit
    from moekit.bench.fp8 import quantize_experts
    from moekit.bench.inputs import make_tokens, make_weights
    from moekit.bench.presets import PRESETS

    device = torch.device("cuda")
    preset = PRESETS[name]
    w = make_weights(preset, torch.bfloat16, device)
    if scheme != "bf16":
        w = quantize_experts(w, scheme)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, device)

    def call():
        if scheme == "bf16":
            moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                 activation=preset.activation, b13=w.b13, b2=w.b2)
        else:
            moekit.fused_experts_fp8(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                     scheme=scheme, activation=preset.activation,
                                     b13=w.b13, b2=w.b2)
    kernels = kernel_blocks_us(call, blocks)
    total = sum(statistics.median(v) for v in kernels.values())
    print(f"{name} M={m} {scheme}: {total:.1f} µs of kernels per call", flush=True)
    for key, values in sorted(kernels.items(), key=lambda kv: -max(kv[1])):
        print(f"  {key[:48]:48s} " + " ".join(f"{v:8.1f}" for v in values), flush=True)
    return {"preset": name, "M": m, "scheme": scheme, "kernels_us": kernels}


def compare(paths: list[str]) -> str:
    """A Markdown table: each GEMM's and the whole call's median µs per version. GEMMs are
    matched by role (a name holding "gemm1" or "gemm2"), so a version that runs another
    kernel for a GEMM (Triton's against Gluon's) still compares; the row names them."""
    runs = [json.load(open(path)) for path in paths]
    head = ("| cell | kernel | " + " | ".join(run["tag"] for run in runs)
            + " | first ÷ last (> 1: last faster) |")
    lines = [head, "|" + "---|" * (len(runs) + 3)]
    for index, cell in enumerate(runs[0]["cells"]):
        label = f"{cell['preset']} M={cell['M']} {cell['scheme']}"
        per_run = [run["cells"][index]["kernels_us"] for run in runs]
        for role in ("gemm1", "gemm2", None):
            values, names = [], []
            for kernels in per_run:
                mine = {k: v for k, v in kernels.items() if role is None or role in k.lower()}
                values.append(sum(statistics.median(v) for v in mine.values()) if mine
                              else float("nan"))
                names.extend(k for k in mine if k not in names)
            kernel = "(all kernels)" if role is None else " → ".join(n[:40] for n in names)
            ratio = values[0] / values[-1] if values[-1] else float("nan")
            lines.append(f"| {label} | {kernel} | " + " | ".join(f"{v:.1f}" for v in values)
                         + f" | {ratio:.3f}× |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--tag", default="run", help="the version's name (the file's stem)")
    parser.add_argument("--cells", nargs="*", default=[], metavar="PRESET:M:SCHEME")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--compare", nargs="+", metavar="JSON",
                        help="print a table of these runs' GEMM times (the last is the ratio's "
                        "denominator) instead of profiling")
    args = parser.parse_args()
    if args.compare:
        print(compare(args.compare))
        return 0
    import torch
    import triton

    cells = []
    for text in args.cells:
        name, m, scheme = text.split(":")
        cells.append(profile_cell(name, int(m), scheme, args.blocks))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump({"tag": args.tag, "device": torch.cuda.get_device_name(0),
                   "torch": torch.__version__, "triton": triton.__version__,
                   "date": datetime.date.today().isoformat(),
                   "git": os.environ.get("MOEKIT_GIT_COMMIT", "?"),
                   "command": " ".join(sys.argv), "cells": cells}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
