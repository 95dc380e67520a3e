"""Experiment: would GEMM1 lose its per-launch ~8.6 µs and its step if work were balanced?

The plan GEMM1 at decode runs one program per (expert hit, 128-column tile): each reads
that tile's 128 gate and 128 up rows of w13 over all of H (0.5 MB in fp8 at qwen3's H =
2048), and its time is 8.6 µs + bytes ÷ 3.18 TB/s, plus a step of ~6 µs where the
programs pass 264, two an SM (session 72, `gemm1_waves_experiment.py`). Neither deeper
pipelines, 8 warps nor a K split (0.91–0.93×) took it away. Untried: persistent programs
that share the tiles out evenly, each walking its share as one pipelined loop.

This reads the same bytes as GEMM1 would (the gate and up rows of n experts' tiles, fp8
or bf16, 128-byte steps, two swapped 16-column dots a step, as the kernel issues them) in
four ways, each timed by CUDA-graph replay with L2 read-flushed:

- `tiles`: one program a tile, the library's grid (`flat tiles`: its K loop written as the
  persistent runs' one loop, with the epilogue under a condition);
- `units U / P`: P programs, each a contiguous run of U-column units (U = 128 is a
  tile, 64 and 32 parts of one) as one loop over its units' K steps — what a persistent
  GEMM1 could do without partial sums (for fp8 the 1×128 groups of GEMM2's input would
  need whole 128-column tiles, so U < 128 is the 16-bit form); `nested units`: the same
  runs as a loop over units around each unit's pipelined K loop (a pipeline fill a unit);
- `steps / P`: P programs, each a contiguous run of K steps, cut anywhere — the ideal
  balance (a split-K GEMM1 would pay partial sums for it);
- `stream`: a plain contiguous read of the same number of bytes.

If balance is what GEMM1 lacks, `units` and `steps` lose the step at 264 and most of the
fixed cost, and come near `stream`; if they do not, the loss is per launch in any form.

    MOEKIT_GIT_COMMIT=$(git rev-parse --short HEAD) PYTHONPATH=src \
        python3 bench/scripts/balanced_read_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import os

import torch
import triton
import triton.language as tl

from moekit.bench.experiment_files import experiment_meta, rows_table, write_experiment
from moekit.bench.stream_read import stream_read
from moekit.bench.timing import graph_replay_us

STEM = "balanced-read-experiment"
TITLE = "GEMM1's weight reads, one program a tile against balanced persistent programs"
H, INTER = 2048, 768  # qwen3-30b-a3b
STAGES, WARPS = 4, 4  # the plan GEMM1's decode tile
BLOCK_K = {"fp8": 128, "bf16": 64}  # 128 bytes of a weight row a step
DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}
EXPERTS_HIT = (32, 44, 45, 50, 56, 64, 96, 128)


@triton.jit
def _gemm1_read_kernel(w_ptr, out_ptr, total_steps, programs, INTER: tl.constexpr,
                       K: tl.constexpr, UNIT: tl.constexpr, BLOCK_K: tl.constexpr,
                       STAGES: tl.constexpr, WHOLE_UNITS: tl.constexpr,
                       NESTED: tl.constexpr):
    """Program p takes K steps [p·T/P, (p + 1)·T/P) of the T = units × K/BLOCK_K steps
    (cut at unit boundaries when WHOLE_UNITS), step s reading unit s // steps-a-unit's
    UNIT gate rows and UNIT up rows over that step's BLOCK_K bytes into two swapped dots
    against ones; at a unit's last step (or the run's end) the row sums are added
    atomically into out[row], so every row of w13 read ends summed once. NESTED (whole
    units only): a loop over the units around a pipelined K loop, as GEMM1 is written,
    instead of one pipelined loop over all the steps."""
    STEPS: tl.constexpr = K // BLOCK_K
    UNITS_AN_EXPERT: tl.constexpr = INTER // UNIT
    p = tl.program_id(0)
    if WHOLE_UNITS:
        units = total_steps // STEPS
        first = (p * units // programs) * STEPS
        last = ((p + 1) * units // programs) * STEPS
    else:
        first = p * total_steps // programs
        last = (p + 1) * total_steps // programs
    ones = tl.full([16, BLOCK_K], 1.0, dtype=tl.float32).to(w_ptr.dtype.element_ty)
    rows = tl.arange(0, UNIT)
    kk = tl.arange(0, BLOCK_K)
    if NESTED:
        for unit in range(first // STEPS, last // STEPS):
            r = (unit // UNITS_AN_EXPERT) * (2 * INTER) + (unit % UNITS_AN_EXPERT) * UNIT + rows
            gate = tl.zeros([UNIT, 16], dtype=tl.float32)
            up = tl.zeros([UNIT, 16], dtype=tl.float32)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                g = tl.load(w_ptr + r[:, None].to(tl.int64) * K + (k0 + kk)[None, :])
                u = tl.load(w_ptr + (r + INTER)[:, None].to(tl.int64) * K + (k0 + kk)[None, :])
                gate = tl.dot(g, ones.T, gate)
                up = tl.dot(u, ones.T, up)
            tl.atomic_add(out_ptr + r, tl.sum(gate, 1) / 16)
            tl.atomic_add(out_ptr + r + INTER, tl.sum(up, 1) / 16)
        return
    gate = tl.zeros([UNIT, 16], dtype=tl.float32)
    up = tl.zeros([UNIT, 16], dtype=tl.float32)
    for s in tl.range(first, last, num_stages=STAGES):
        unit = s // STEPS
        k0 = (s % STEPS) * BLOCK_K
        expert = unit // UNITS_AN_EXPERT
        r = expert * (2 * INTER) + (unit % UNITS_AN_EXPERT) * UNIT + rows
        g = tl.load(w_ptr + r[:, None].to(tl.int64) * K + (k0 + kk)[None, :])
        u = tl.load(w_ptr + (r + INTER)[:, None].to(tl.int64) * K + (k0 + kk)[None, :])
        gate = tl.dot(g, ones.T, gate)
        up = tl.dot(u, ones.T, up)
        if (s % STEPS == STEPS - 1) | (s == last - 1):
            tl.atomic_add(out_ptr + r, tl.sum(gate, 1) / 16)
            tl.atomic_add(out_ptr + r + INTER, tl.sum(up, 1) / 16)
            gate = tl.zeros([UNIT, 16], dtype=tl.float32)
            up = tl.zeros([UNIT, 16], dtype=tl.float32)


def read_fn(w: torch.Tensor, out: torch.Tensor, n: int, unit: int, programs: int | None,
            whole_units: bool, nested: bool, block_k: int):
    """A launch of the read over n experts' w13 rows; `programs` None: one a unit."""
    total = n * (INTER // unit) * (H // block_k)
    grid = programs or n * (INTER // unit)

    def fn():
        _gemm1_read_kernel[(grid,)](w, out, total, grid, INTER=INTER, K=H, UNIT=unit,
                                    BLOCK_K=block_k, STAGES=STAGES, WHOLE_UNITS=whole_units,
                                    NESTED=nested, num_warps=WARPS)
    return fn


def variants(programs: int) -> dict[str, tuple[int, int | None, bool, bool]]:
    """label → (unit, programs or None for one a unit, whole units, nested loops)."""
    p = programs
    return {"tiles": (128, None, True, True), "flat tiles": (128, None, True, False),
            f"units 128 / {p}": (128, p, True, False), f"units 64 / {p}": (64, p, True, False),
            f"units 32 / {p}": (32, p, True, False),
            f"nested units 64 / {p}": (64, p, True, True),
            f"nested units 32 / {p}": (32, p, True, True),
            f"steps / {p}": (128, p, False, False)}


def run(dtype: str, experts_hit, programs: int, rep_ms: float, log) -> list[dict]:
    device = torch.device("cuda")
    w = torch.randn(max(experts_hit) * 2 * INTER, H, device=device).to(DTYPES[dtype])
    want = w.float().sum(1)
    out = torch.empty(w.shape[0], device=device)
    rows = []
    for n in experts_hit:
        nbytes = n * 2 * INTER * H * w.element_size()
        # the same bytes as 16-bit words (n·1536·2048 / 2: a multiple of stream_read's chunk)
        flat = w.view(torch.uint8).view(-1)[:nbytes].view(torch.bfloat16)
        partials = stream_read(flat)
        row = {"dtype": dtype, "experts": n, "MB": round(nbytes / 1e6, 1)}
        for label, (unit, grid, whole, nested) in variants(programs).items():
            fn = read_fn(w, out, n, unit, grid, whole, nested, BLOCK_K[dtype])
            out.zero_()
            fn()
            torch.cuda.synchronize()
            read = n * 2 * INTER
            # a step skipped or read twice moves a row's sum by ~√BLOCK_K ≈ 11
            if not torch.allclose(out[:read], want[:read], rtol=1e-2, atol=0.5):
                raise RuntimeError(f"{label} at n = {n}: row sums wrong")
            us = graph_replay_us(fn, rep_ms=rep_ms)
            row[f"{label} µs"] = round(us, 2)
        us = graph_replay_us(lambda f=flat, p=partials: stream_read(f, p), rep_ms=rep_ms)
        row["stream µs"] = round(us, 2)
        row["tiles TB/s"] = round(nbytes / row["tiles µs"] / 1e6, 3)
        log(row)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp8", "bf16"], choices=list(DTYPES))
    parser.add_argument("--experts", type=int, nargs="+", default=list(EXPERTS_HIT))
    parser.add_argument("--programs", type=int, default=0,
                        help="persistent programs (default: two an SM)")
    parser.add_argument("--rep-ms", type=float, default=25)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    programs = args.programs or 2 * torch.cuda.get_device_properties(0).multi_processor_count
    rows = [row for dtype in args.dtypes
            for row in run(dtype, args.experts, programs, args.rep_ms,
                           lambda r: print(r, flush=True))]
    meta = experiment_meta(H=H, inter=INTER, block_k=BLOCK_K, stages=STAGES, warps=WARPS,
                           programs=programs)
    notes = [f"- qwen3-30b-a3b's w13 (H = {H}, I = {INTER}); n experts' gate and up rows "
             f"read in 128-byte steps (fp8 128 deep, bf16 64), {STAGES} stages, {WARPS} warps",
             "- CUDA-graph replay, L2 read-flushed, median µs; stream: a contiguous read of "
             "the same bytes; tiles TB/s: the bytes over tiles' µs"]
    write_experiment(args.out, STEM, meta, rows, TITLE, notes,
                     rows_table(rows, list(rows[0])))
    print(f"wrote {os.path.join(args.out, STEM)}.json and .md")


if __name__ == "__main__":
    main()
