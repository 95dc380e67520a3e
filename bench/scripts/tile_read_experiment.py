"""Experiment: does the width of a weight tile's rows limit how fast a GEMM streams them?

Granite's Gluon GEMM1 streams w13 at 2.5–2.8 TB/s even where each weight byte is read
once (M = 128: 126 MB in 45.6 µs; bench/NOTES.md, session 23), and 32-deep K steps (64
bytes of each weight row per copy) measured 3–20% slower than 64-deep ones (128 bytes;
session 26) with more bytes in flight. Hypothesis: a K step's box reads BLOCK_N short
row pieces 2·H bytes apart, and DRAM serves such short pieces below its streaming rate,
so the bytes each copy takes from a row, not the bytes in flight, set the ceiling.

This reads a [R, K] bf16 matrix (R·K·2 bytes, the size of granite's w13) as a GEMM does:
a program per block of BLOCK_R rows walks K in BLOCK_K steps through TMA boxes of
[BLOCK_R, BLOCK_K] into pipelined shared memory (a 16-row dot consumes each, so Triton's
pipeliner keeps `stages` in flight), at several (BLOCK_R, BLOCK_K, stages), against a
plain contiguous stream of the same bytes (`stream_read`). CUDA-graph replay, L2
read-flushed, median µs over four rounds in rotated order. If the hypothesis holds,
GB/s rises with BLOCK_K at equal bytes in flight per program (BLOCK_R·BLOCK_K·stages).

Session 67 asks it again for the fp8 decode GEMM2 (mixtral M = 1: 128 programs, one an
SM, stream 64 weight rows × 128 one-byte values a step at ~65% of the DRAM bandwidth, and
neither deeper pipelines nor twice the programs help): can 128 programs of one warpgroup
read two experts' w2 ([8192, 14336] bytes, viewed as [8192, 7168] bf16) near the stream's
rate at all, through TMA or through pointer loads (cp.async, what the fp8 GEMM2 issues),
and does splitting K over more programs change it? `--shapes 8192x7168 --loads tma ptr
--splits 1 2 --variants 64x64x4 64x64x6 64x128x4`.

    PYTHONPATH=src python3 bench/scripts/tile_read_experiment.py --out $OUT \
        [--shapes 8192x7168 ...] [--variants 64x64x4 ...] [--loads tma ptr] [--splits 1 2]

Without options it runs session 26's form (its three shapes and variants, TMA, K whole);
one kernel serves both, so that form's labels now read e.g. `64x64x4-tma/1`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import triton
import triton.language as tl
from half_tile_experiment import write_rows  # this directory
from triton.tools.tensor_descriptor import TensorDescriptor

from moekit.bench.stream_read import BLOCK, UNROLL, stream_read
from moekit.bench.timing import graph_replay_us

# (BLOCK_R, BLOCK_K, stages): 32 KB in flight per program for every K step at 64 rows,
# then the same steps with twice the rows, and the widest step at fewer stages.
VARIANTS = [(64, 32, 8), (64, 64, 4), (64, 128, 2), (64, 256, 1),
            (128, 32, 8), (128, 64, 4), (128, 128, 2),
            (64, 64, 8), (64, 128, 4), (64, 256, 2)]
SHAPES = [(1024 * 40, 1536), (256 * 128, 2048), (5760 * 8, 2880)]  # granite, qwen3, gpt-oss w13
ROUNDS = 4


@triton.jit
def _tile_read_kernel(w_desc, w_ptr, out_ptr, K, stride_w, K_PART,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                            STAGES: tl.constexpr, TMA: tl.constexpr):
    """Program (p, s): a 16-row dot of ones against rows [p·BLOCK_R, +BLOCK_R) of w over
    K part s ([s·K_PART, +K_PART)), K-step by K-step, its tiles through TMA (`w_desc`) or
    pointer loads (`w_ptr`, cp.async when pipelined); the row sums of its first output
    row added atomically into out (so nothing is optimised away)."""
    r0 = tl.program_id(0) * BLOCK_R
    k_lo = tl.program_id(1) * K_PART
    ones = tl.full([16, BLOCK_K], 1.0, dtype=tl.float32).to(w_ptr.dtype.element_ty)
    acc = tl.zeros([16, BLOCK_R], dtype=tl.float32)
    r = r0 + tl.arange(0, BLOCK_R)
    kk = tl.arange(0, BLOCK_K)
    for k0 in tl.range(k_lo, k_lo + K_PART, BLOCK_K, num_stages=STAGES):
        if TMA:
            tile = w_desc.load([r0, k0])
        else:
            tile = tl.load(w_ptr + r[:, None] * stride_w + (k0 + kk)[None, :])
        acc = tl.dot(ones, tile.T, acc)
    rows = tl.arange(0, 16)[:, None]
    tl.atomic_add(out_ptr + r[None, :] + rows * 0, acc, mask=rows == 0)


def _matrix_and_stream(rows: int, k: int):
    """A random [rows, k] bf16 matrix on the GPU and {"stream": a contiguous read of it}."""
    w = torch.randn(rows, k, dtype=torch.bfloat16, device=torch.device("cuda"))
    flat = w.view(-1)[: w.numel() // (BLOCK * UNROLL) * (BLOCK * UNROLL)]
    partials = stream_read(flat)
    return w, {"stream": lambda: stream_read(flat, partials)}


def _timed_row(w: torch.Tensor, fns: dict, log) -> dict:
    """Each read of `w` in `fns` timed (graph replay, ROUNDS rounds in rotated order): the
    row of medians (µs and GB/s by name), logged."""
    rows, k = w.shape
    nbytes = w.numel() * 2
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(graph_replay_us(fns[name], rep_ms=30))
    row = {"rows": rows, "K": k, "MB": nbytes / 1e6}
    parts = []
    for name in names:
        us = statistics.median(samples[name])
        row[f"{name}_us"] = us
        row[f"{name}_GBps"] = nbytes / us / 1e3
        parts.append(f"{name} {us:.1f} µs ({nbytes / us / 1e3:.0f} GB/s)")
    log(f"[{rows}, {k}] bf16, {nbytes / 1e6:.0f} MB: " + "; ".join(parts))
    return row


def run_shape(rows: int, k: int, variants, loads: list[str], splits: list[int], log) -> dict:
    """`variants` of a [rows, k] read through each of `loads` ("tma", "ptr") with K cut
    into each of `splits` parts (a program per row block and part), and the stream."""
    w, fns = _matrix_and_stream(rows, k)
    out = torch.zeros(rows, dtype=torch.float32, device=w.device)
    ref = w[: 64 * 4].float().sum(1)
    for (br, bk, stages), how, split in [(v, how, s) for v in variants for how in loads
                                         for s in splits]:
        if k % (split * bk):
            log(f"skip {br}x{bk}x{stages} {how} split {split}: K {k} not a multiple")
            continue
        desc = TensorDescriptor.from_tensor(w, [br, bk])

        def fn(desc=desc, br=br, bk=bk, stages=stages, how=how, split=split):
            _tile_read_kernel[(rows // br, split)](
                desc, w, out, k, w.stride(0), k // split, BLOCK_R=br, BLOCK_K=bk,
                STAGES=stages, TMA=how == "tma", num_warps=4)
        out.zero_()
        fn()
        torch.cuda.synchronize()
        if not torch.allclose(out[: 64 * 4], ref, rtol=1e-2, atol=1e-1):
            raise RuntimeError(f"tile read {br}x{bk}x{stages} {how} /{split}: wrong row sums")
        fns[f"{br}x{bk}x{stages}-{how}/{split}"] = fn
    return _timed_row(w, fns, log)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--shapes", nargs="+", help="ROWSxK bf16 matrices (default: "
                        "session 26's three w13 sizes, TMA only, one part)")
    parser.add_argument("--variants", nargs="+", help="BLOCK_RxBLOCK_KxSTAGES (bf16)")
    parser.add_argument("--loads", nargs="+", choices=["tma", "ptr"])
    parser.add_argument("--splits", nargs="+", type=int)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    variants = ([tuple(map(int, v.split("x"))) for v in args.variants] if args.variants
                else VARIANTS)
    rows = []
    with open(os.path.join(args.out, "tile-read-experiment.log"), "w") as logf:
        def log(line):
            print(line, flush=True)
            logf.write(line + "\n")
        for r, k in shapes:
            rows.append(run_shape(r, k, variants, args.loads or ["tma"], args.splits or [1],
                                  log))
            write_rows(args.out, "tile-read-experiment", rows, variants=variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
