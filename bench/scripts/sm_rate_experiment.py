"""Experiment: how fast can one SM read from DRAM when few SMs are reading?

The plan GEMM1's decode time steps up by ~5 µs when its programs outnumber two per SM
by a few (`gemm1_waves_experiment.py`), at any pipeline depth, and 96 programs on 96 SMs
read 2.3 TB/s in all — 24 GB/s an SM, the whole stream's rate divided by 132. If an SM
cannot read faster than about its share of the stream, a kernel's time is its busiest SM's
bytes over that rate, and only work balanced per SM (not per program) removes the steps.

This reads contiguous bytes with P programs of S bytes each (16-byte loads, UNROLL loads
of BLOCK elements in flight per step, ≤ 132 programs: one an SM; 264: two), each call on
fresh bytes (a region past the last one's, L2 never holds them), and reports each
kernel's CUDA µs (torch.profiler, mean of 10 calls) and the rate per program.

    PYTHONPATH=src python3 bench/scripts/sm_rate_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import os

import torch
import triton
import triton.language as tl
from torch.profiler import ProfilerActivity, profile

from moekit.bench.experiment_files import experiment_meta, rows_table, write_experiment

STEM = "sm-rate-experiment"
TITLE = "DRAM read rate per SM against the SMs reading"
PROGRAMS = (8, 16, 32, 64, 96, 132, 264)
BYTES_PER_PROGRAM = (524288, 2097152)
SHAPES = ((1024, 8, 4), (2048, 8, 8), (4096, 8, 8))  # (BLOCK int32 elements, UNROLL, warps)
CALLS = 10


@triton.jit
def _chunk_read_kernel(x_ptr, out_ptr, base, per_program, BLOCK: tl.constexpr,
                       UNROLL: tl.constexpr):
    """Program p sums x[base + p·per_program, … + per_program) (int32 elements)."""
    start = base + tl.program_id(0).to(tl.int64) * per_program
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for step in range(0, per_program, BLOCK * UNROLL):
        for u in tl.static_range(UNROLL):
            acc += tl.load(x_ptr + start + step + u * BLOCK + tl.arange(0, BLOCK))
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


def time_reads(buffer: torch.Tensor, programs: int, per_program: int, shape) -> float:
    """Mean CUDA µs of a read of programs × per_program int32 elements, fresh each call."""
    block, unroll, warps = shape
    out = torch.empty(programs, dtype=torch.int32, device=buffer.device)
    region = programs * per_program
    regions = buffer.numel() // region

    def read(i):
        _chunk_read_kernel[(programs,)](buffer, out, (i % regions) * region, per_program,
                                        BLOCK=block, UNROLL=unroll, num_warps=warps)
    for i in range(3):
        read(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(3, 3 + CALLS):
            read(i)
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages()
               if "_chunk_read" in e.key) / CALLS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    buffer = torch.ones(3 * 2**30 // 4, dtype=torch.int32, device="cuda")  # 3 GiB
    rows = []
    for shape in SHAPES:
        for nbytes in BYTES_PER_PROGRAM:
            for programs in PROGRAMS:
                us = time_reads(buffer, programs, nbytes // 4, shape)
                row = {"block×unroll×warps": "×".join(map(str, shape)), "programs": programs,
                       "MB_per_program": nbytes / 1e6, "us": round(us, 2),
                       "TBps": round(programs * nbytes / us / 1e6, 3),
                       "GBps_per_program": round(nbytes / us / 1e3, 1)}
                print(row, flush=True)
                rows.append(row)
    meta = experiment_meta(calls=CALLS)
    notes = ["- per-kernel CUDA µs (torch.profiler), mean of "
             f"{CALLS} calls, each on bytes no earlier call read"]
    write_experiment(args.out, STEM, meta, rows, TITLE, notes, rows_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
