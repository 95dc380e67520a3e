"""Experiment: do the fp8 decode GEMMs stream slower because Triton converts their fp8
operands to fp16?

On the H100 (session 42's tables) the fp8 decode cells stream weights well below the bf16
ones of the same shapes: deepseek-v3 M = 1 at 76% of the roofline against bf16's 94%,
mixtral M = 1 71% against 91%, with the same bytes per K step. Compiled for sm_90, a
dot of a 16-row activation tile against a weight tile, `x · Wᵀ`, is an `mma.sync` whose
fp8 operands Triton first converts to fp16 (`cvt.rn.f16x2.e4m3x2`): each of the 4 warps
converts the whole activation tile again, about two values per weight byte. Swapped,
`W · xᵀ` (weight rows as the MMA's 64-row side, tokens as its N = 16), it is a native
`wgmma … m64n16k32.e4m3` with no conversion at all (session 43, PTX on the CPU).
Hypothesis: the conversions bound the stream; swapped tiles stream fp8 as fast as bf16.

A program per BLOCK_N rows of a [N, K] weight walks K in BLOCK_K steps (Triton's
pipeliner keeps `stages` in flight), against T real token rows of a 16-row tile (the
rest masked to zero, as a decode expert's block holds), in either orientation, fp8 and
bf16, against a plain contiguous read of the same bytes (`stream_read`). CUDA-graph
replay, L2 read-flushed, median µs over rounds in rotated order; every variant's output
checked against torch first.

    PYTHONPATH=src python3 bench/scripts/swap_ab_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import triton
import triton.language as tl

from moekit.bench.experiment_files import experiment_meta, write_experiment
from moekit.bench.stream_read import BLOCK, UNROLL, stream_read
from moekit.bench.timing import graph_replay_us

# (dtype, swapped, BLOCK_N, BLOCK_K, stages). Unswapped first: the fp8 direct GEMM1's tile
# (32 × 256 × 4), the fp8 plan GEMM1's at 16 rows (64 × 128 × 4), the bf16 direct
# GEMM1's (32 × 128 × 5); then the same bytes per step swapped (BLOCK_N ≥ 64: the MMA's
# row side).
VARIANTS = [("fp8", False, 32, 256, 4), ("fp8", False, 64, 128, 4),
            ("fp8", True, 64, 128, 4), ("fp8", True, 64, 256, 4), ("fp8", True, 128, 128, 4),
            ("fp8", True, 128, 256, 3),
            ("bf16", False, 32, 128, 5), ("bf16", True, 64, 128, 4)]
# [N, K] weights: deepseek-v3's GEMM1 over 8 experts, mixtral's w13, qwen3's GEMM1 over 8.
SHAPES = [("deepseek-v3 w13 ×8", 8 * 4096, 7168), ("mixtral w13", 28672, 4096),
          ("qwen3 w13 ×8", 8 * 1536, 2048)]
TOKENS = [1, 16]
ROUNDS = 3
DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}


@triton.jit
def _stream_gemm_kernel(w_ptr, x_ptr, out_ptr, N, K, T, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, STAGES: tl.constexpr, SWAPPED: tl.constexpr):
    """out[t, n] = Σ_k x[t, k] · w[n, k] for program p's rows n of [p·BLOCK_N, +BLOCK_N),
    t < T; x is read as a 16-row tile, rows ≥ T zero."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = tl.arange(0, 16)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    x_ptrs = x_ptr + rt[:, None] * K + rk[None, :]
    if SWAPPED:
        acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    else:
        acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for _ in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        w = tl.load(w_ptrs)
        x = tl.load(x_ptrs, mask=rt[:, None] < T, other=0.0)
        if SWAPPED:
            acc = tl.dot(w, x.T, acc)
        else:
            acc = tl.dot(x, w.T, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if SWAPPED:
        tl.store(out_ptr + rt[None, :] * N + rn[:, None], acc, mask=rt[None, :] < T)
    else:
        tl.store(out_ptr + rt[:, None] * N + rn[None, :], acc, mask=rt[:, None] < T)


def _name(variant) -> str:
    dtype, swapped, bn, bk, stages = variant
    return f"{dtype} {'W·xT' if swapped else 'x·WT'} {bn}x{bk}x{stages}"


def run_shape(label: str, n: int, k: int, tokens: int, log) -> dict:
    dev = torch.device("cuda")
    master = torch.randn(n, k, device=dev) * 0.05
    xs = torch.randn(16, k, device=dev)
    out = torch.empty(tokens, n, dtype=torch.float32, device=dev)
    fns, nbytes = {}, {}
    for dtype_name in DTYPES:
        w = master.to(DTYPES[dtype_name])
        x = xs.to(DTYPES[dtype_name])
        ref = x[:tokens].float() @ w.float().T
        flat = w.view(torch.uint8).view(-1)
        flat = flat[: flat.numel() // (BLOCK * UNROLL * 4) * (BLOCK * UNROLL * 4)]
        flat = flat.view(torch.float32)
        partials = stream_read(flat)
        fns[f"{dtype_name} stream"] = lambda flat=flat, partials=partials: stream_read(
            flat, partials)
        nbytes[f"{dtype_name} stream"] = flat.numel() * 4
        for variant in VARIANTS:
            dtype, swapped, bn, bk, stages = variant
            if dtype != dtype_name:
                continue

            def fn(w=w, x=x, bn=bn, bk=bk, stages=stages, swapped=swapped):
                _stream_gemm_kernel[(n // bn,)](w, x, out, n, k, tokens, BLOCK_N=bn,
                                                BLOCK_K=bk, STAGES=stages, SWAPPED=swapped,
                                                num_warps=4)
            out.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            err = ((out - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                raise RuntimeError(f"{_name(variant)} on {label}: relative error {err:.3g}")
            fns[_name(variant)] = fn
            nbytes[_name(variant)] = w.numel() * w.element_size()
    names = list(fns)
    samples = {name: [] for name in names}
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(graph_replay_us(fns[name], rep_ms=30))
    row = {"shape": label, "N": n, "K": k, "T": tokens}
    parts = []
    for name in names:
        us = statistics.median(samples[name])
        gbps = nbytes[name] / us / 1e3
        row[f"{name} us"], row[f"{name} GBps"] = us, gbps
        parts.append(f"{name} {us:.1f} µs {gbps:.0f} GB/s")
    log(f"{label} [{n}, {k}] T={tokens}: " + "; ".join(parts))
    return row


def _table(rows: list[dict]) -> list[str]:
    names = [f"{d} stream" for d in DTYPES] + [_name(v) for v in VARIANTS]
    lines = ["| shape | T | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for row in rows:
        cells = [f"{row[f'{name} GBps']:.0f}" for name in names]
        lines.append(f"| {row['shape']} | {row['T']} | " + " | ".join(cells) + " |")
    return ["GB/s of weight bytes (stream: the same bytes read contiguously):", "", *lines]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    rows = []
    meta = experiment_meta(rounds=ROUNDS, variants=[_name(v) for v in VARIANTS])

    def log(line):
        print(line, flush=True)

    for label, n, k in SHAPES:
        for tokens in TOKENS:
            rows.append(run_shape(label, n, k, tokens, log))
            write_experiment(args.out, "swap-ab-experiment", meta, rows,
                             "fp8 decode GEMM tiles: x·Wᵀ (mma.sync, fp8 converted) against "
                             "W·xᵀ (native fp8 wgmma)", [], _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
