"""Experiment: the 16-bit GEMM1 as a warp-specialised Gluon kernel (`moekit._gluon_gemm1_16bit`)
against Triton's GEMM1, at the 128-row (compute-bound) tiles.

Prediction (session 19): Triton's bf16 GEMM1 runs at ~74% of the bf16 peak on qwen3 M =
4096 (400 µs; its warps issue both the gathered rows' copies and the MMAs); the fp8 Gluon
GEMM1, the same structure, reached 70% of the fp8 peak where Triton's fp8 reached 37–55%.
With 16-bit operands the MMA is twice as slow per byte, so the producer has more slack:
GEMM1 toward ~82% of the peak (~360 µs), the layer ~5% faster at M = 4096–16384 on the
presets whose I is a multiple of 128 (all but gpt-oss).

Each cell times, in interleaved rounds, GEMM1 alone (over one dispatch plan) and the whole
`fused_experts`, Gluon GEMM1 on and off (`MOEKIT_GLUON`), by CUDA-graph replay with L2
read-flushed, and checks the Gluon layer against the Triton one and both against the
float32 reference (on 256 tokens' rows). Since session 20 `MOEKIT_GLUON` switches the
16-bit Gluon GEMM2 (`moekit._gluon_gemm2_16bit`) too, so the layer rows and `--profile`
compare both GEMMs; "GEMM1 alone" is GEMM1's.

    PYTHONPATH=src python3 bench/scripts/gluon_gemm1_16bit_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch
import triton
from fp8_kernel_profile import kernel_blocks_us  # this directory: per-kernel µs by block

import moekit
import moekit._gluon_gemm1_16bit
from moekit import reference
from moekit._gluon import DISABLE_ENV
from moekit._tma import use_tma
from moekit.bench.ceilings import _matmul_TFLOPs
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.dispatch import dispatch_plan
from moekit.experts import launch_gemm1
from moekit.tuning.heuristic import tiles_for_block_m

CELLS = [("qwen3-30b-a3b", m) for m in (1024, 4096, 16384)] + [
    ("deepseek-v2-lite", 4096), ("olmoe-1b-7b", 1024), ("olmoe-1b-7b", 4096),
    ("granite-3.0-3b-a800m", 1024), ("granite-3.0-3b-a800m", 4096),
    ("deepseek-v3", 4096), ("mixtral-8x7b", 1024), ("mixtral-8x7b", 4096)]


def timed(gluon: bool, fn) -> float:
    """Graph replay µs of `fn`, captured with the Gluon GEMM1 on or off."""
    os.environ[DISABLE_ENV] = "1" if gluon else "0"
    try:
        return graph_replay_us(fn)
    finally:
        os.environ.pop(DISABLE_ENV, None)


def run_cell(name: str, m: int, rounds: int) -> dict:
    preset = PRESETS[name]
    device = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, device)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, device)
    config = tiles_for_block_m(128)
    act = moekit.Activation.parse(preset.activation)
    plan = dispatch_plan(topk.ids, preset.num_experts, config.tail_block_m,
                         tile_m=config.block_m, backend="triton")
    tma = use_tma(hidden, w.w13, w.w2, 128)
    gemm1 = config.as_ints()[1:6]

    def layer(out):
        return lambda: moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                            activation=act, b13=w.b13, b2=w.b2,
                                            config=config, out=out)

    def gemm1_only():
        return launch_gemm1(hidden, w.w13, w.b13, topk.weights.view(-1), plan, act.kind,
                            act.alpha, act.limit, False, gemm1, tma)

    outs = {}
    for gluon in (True, False):
        os.environ[DISABLE_ENV] = "1" if gluon else "0"
        outs[gluon] = torch.full_like(hidden, float("nan"))
        layer(outs[gluon])()
        os.environ.pop(DISABLE_ENV, None)
    times = {key: [] for key in ("gemm1 gluon", "gemm1 triton", "layer gluon", "layer triton")}
    for _ in range(rounds):
        for gluon in (True, False):
            tag = "gluon" if gluon else "triton"
            times[f"gemm1 {tag}"].append(timed(gluon, gemm1_only))
            times[f"layer {tag}"].append(timed(gluon, layer(outs[gluon])))
    rows = min(m, 256)
    expected = reference.fused_experts(
        hidden[:rows].float(), w.w13.float(), w.w2.float(), topk.ids[:rows],
        topk.weights[:rows], activation=act,
        b13=None if w.b13 is None else w.b13.float(), b2=None if w.b2 is None else w.b2.float())

    def err(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()
    flops = 2 * m * preset.top_k * 2 * preset.inter * preset.hidden
    row = {"preset": name, "M": m, **{k: statistics.median(v) for k, v in times.items()},
           "rounds_us": times, "gemm1_TFLOPs_gluon": None, "gemm1_TFLOPs_triton": None,
           "rel_err_gluon": err(outs[True][:rows], expected),
           "rel_err_triton": err(outs[False][:rows], expected),
           "gluon_vs_triton": err(outs[True], outs[False])}
    for tag in ("gluon", "triton"):
        row[f"gemm1_TFLOPs_{tag}"] = flops / row[f"gemm1 {tag}"] / 1e6
    print(f"{name} M={m}: GEMM1 {row['gemm1 triton']:.1f} → {row['gemm1 gluon']:.1f} µs, "
          f"layer {row['layer triton']:.1f} → {row['layer gluon']:.1f} µs; errors "
          f"{row['rel_err_gluon']:.1e} / {row['rel_err_triton']:.1e}, apart "
          f"{row['gluon_vs_triton']:.1e}", flush=True)
    return row


def profile_cell(name: str, m: int, calls: int = 10) -> dict:
    """Per-kernel CUDA µs per call inside the layer (torch.profiler, eager, no flush), Gluon
    GEMM1 on and off, alternating blocks of `calls` calls: does GEMM1's gain reach the layer,
    or do the kernels around it slow down?"""
    preset = PRESETS[name]
    w = make_weights(preset, torch.bfloat16, torch.device("cuda"))
    hidden, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
    config = tiles_for_block_m(128)
    out = torch.empty_like(hidden)

    def call():
        moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                             activation=preset.activation, b13=w.b13, b2=w.b2, config=config,
                             out=out)
    result = {}
    for block in range(4):
        gluon = block % 2 == 0
        os.environ[DISABLE_ENV] = "1" if gluon else "0"
        kernels = kernel_blocks_us(call, 1, calls)
        os.environ.pop(DISABLE_ENV, None)
        tag = "gluon" if gluon else "triton"
        for kernel, (us,) in kernels.items():
            result.setdefault(f"{tag} {kernel}", []).append(us)
    print(f"{name} M={m} per call, two blocks each:", flush=True)
    for key, values in sorted(result.items()):
        print(f"  {key:40s} " + " ".join(f"{v:8.1f}" for v in values), flush=True)
    return {"preset": name, "M": m, "kernels_us": result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cells", nargs="*", metavar="PRESET:M",
                        help="only these cells (default: CELLS)")
    parser.add_argument("--stages", type=int, help="the Gluon kernel's ring depth (default: "
                        "the module's STAGES)")
    parser.add_argument("--max-hidden", type=int, help="the largest H the Gluon kernel "
                        "takes (default: the module's MAX_HIDDEN)")
    parser.add_argument("--profile", action="store_true",
                        help="per-kernel times inside the layer (torch.profiler), not timings")
    args = parser.parse_args()
    if args.max_hidden:
        moekit._gluon_gemm1_16bit.MAX_HIDDEN = args.max_hidden
    if args.profile:
        cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells or []]
        os.makedirs(args.out, exist_ok=True)
        found = [profile_cell(name, m) for name, m in cells]
        with open(os.path.join(args.out, "gluon-gemm1-16bit-profile.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                       "triton": triton.__version__, "date": datetime.date.today().isoformat(),
                       "git": os.environ.get("MOEKIT_GIT_COMMIT", "?"),
                       "command": " ".join(sys.argv), "cells": found}, f, indent=1)
        return 0
    if args.stages:
        moekit._gluon_gemm1_16bit.STAGES = args.stages
    os.makedirs(args.out, exist_ok=True)
    cells = CELLS
    if args.cells:
        cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells]
    peak = _matmul_TFLOPs(8192, torch.bfloat16, "cuda", None)
    print(f"bf16 matmul peak this run: {peak:.0f} TFLOP/s", flush=True)
    rows = []
    for name, m in cells:
        rows.append(run_cell(name, m, args.rounds))
        torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.date.today().isoformat(),
            "git": os.environ.get("MOEKIT_GIT_COMMIT", "?"), "command": " ".join(sys.argv),
            "bf16_TFLOPs": peak, "stages": moekit._gluon_gemm1_16bit.STAGES}
    stem = "gluon-gemm1-16bit-experiment" + (f"-stages{args.stages}" if args.stages else "")
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(f"# 16-bit Gluon GEMM1 against Triton's, {meta['device']}, {meta['date']}\n\n")
        f.write("".join(f"- {k}: {v}\n" for k, v in meta.items() if k not in ("device", "date")))
        f.write("- CUDA-graph replay, L2 read-flushed, median of "
                f"{args.rounds} interleaved rounds; 128-row tiles with tail tiles; GEMM1 % = "
                "its flops over the bf16 peak above\n\n")
        f.write("| cell | GEMM1 Triton µs (%) | GEMM1 Gluon µs (%) | speed-up | layer Triton µs"
                " | layer Gluon µs | speed-up | rel err Gluon / Triton |\n"
                "|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['preset']} M={r['M']} | {r['gemm1 triton']:.1f} "
                    f"({100 * r['gemm1_TFLOPs_triton'] / peak:.0f}%) | {r['gemm1 gluon']:.1f} "
                    f"({100 * r['gemm1_TFLOPs_gluon'] / peak:.0f}%) | "
                    f"{r['gemm1 triton'] / r['gemm1 gluon']:.3f} | {r['layer triton']:.1f} | "
                    f"{r['layer gluon']:.1f} | {r['layer triton'] / r['layer gluon']:.3f} | "
                    f"{r['rel_err_gluon']:.1e} / {r['rel_err_triton']:.1e} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
