"""Sweep tile configurations of the two expert GEMMs on a GPU, to calibrate the heuristic.

Times the whole `fused_experts` (CUDA-graph replay) for each candidate of GEMM1 with
GEMM2 at the heuristic's choice, then each candidate of GEMM2 with GEMM1 at its best,
and reports the best of each against the heuristic. Usage:
    PYTHONPATH=src python bench/scripts/sweep_tiles.py --presets qwen3-30b-a3b --out DIR
"""

import argparse
import json
import os
import time

import torch

import moekit
from moekit import reference
from moekit.bench.presets import PRESETS
from moekit.tuning import ExpertsConfig, GemmConfig, default_config

CANDIDATES = {
    16: [(32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 4, 3), (64, 256, 4, 3),
         (32, 256, 4, 3), (128, 128, 4, 3)],
    32: [(32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 4, 3), (64, 256, 4, 3),
         (128, 128, 4, 3)],
    64: [(64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 4), (64, 128, 4, 3), (128, 128, 8, 3),
         (256, 64, 8, 3)],
    128: [(64, 64, 8, 4), (128, 64, 8, 4), (128, 128, 8, 3), (256, 64, 8, 3), (64, 128, 8, 3),
          (128, 64, 4, 4), (128, 64, 8, 3), (128, 32, 8, 5), (256, 32, 8, 4), (64, 64, 4, 5)],
}


def graph_time(fn, reps=50):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1000)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="qwen3-30b-a3b,mixtral-8x7b,gpt-oss-120b")
    ap.add_argument("--tokens", default="1,16,64,256,1024,4096")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    rows = []
    for preset in args.presets.split(","):
        p = PRESETS[preset]
        E, k, H, I, act, bias = p.num_experts, p.top_k, p.hidden, p.inter, p.activation, p.bias
        w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H**0.5
        w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
        b13 = torch.randn(E, 2 * I, device="cuda", dtype=torch.bfloat16) * 0.1 if bias else None
        b2 = torch.randn(E, H, device="cuda", dtype=torch.bfloat16) * 0.1 if bias else None
        for M in [int(t) for t in args.tokens.split(",")]:
            hidden = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
            ids, weights = reference.route(torch.randn(M, E, device="cuda"), k)
            base = default_config(M, E, k, H, I)

            def run(cfg, hidden=hidden, ids=ids, weights=weights, act=act, b13=b13, b2=b2,
                    w13=w13, w2=w2):
                def fn():
                    moekit.fused_experts(hidden, w13, w2, ids, weights, activation=act,
                                         b13=b13, b2=b2, config=cfg)
                try:
                    return graph_time(fn)
                except Exception as exc:  # out of resources etc.
                    print(f"  {cfg}: {type(exc).__name__}", flush=True)
                    return float("inf")

            t0 = time.time()
            t_base = run(base)
            best1, t1 = base.gemm1, t_base
            for bn, bk, w, s in CANDIDATES[base.block_m]:
                c = GemmConfig(bn, bk, base.gemm1.group_m, w, s)
                t = run(ExpertsConfig(base.block_m, c, base.gemm2))
                if t < t1:
                    best1, t1 = c, t
            best2, t2 = base.gemm2, t1
            for bn, bk, w, s in CANDIDATES[base.block_m]:
                c = GemmConfig(bn, bk, base.gemm2.group_m, w, s)
                t = run(ExpertsConfig(base.block_m, best1, c))
                if t < t2:
                    best2, t2 = c, t
            row = dict(preset=preset, M=M, block_m=base.block_m, heuristic_us=t_base,
                       best_us=t2, best_gemm1=best1.__dict__, best_gemm2=best2.__dict__)
            rows.append(row)
            print(f"{preset:22s} M={M:6d} bm={base.block_m:3d} heuristic {t_base:9.1f} µs  "
                  f"best {t2:9.1f} µs  g1={tuple(best1.__dict__.values())} "
                  f"g2={tuple(best2.__dict__.values())}  ({time.time() - t0:.0f}s)", flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
