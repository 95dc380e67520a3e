"""Sweep of the per-tensor amax pass (`_amax_partials_kernel`): block, warps and programs.

The pass reads hidden once (qwen3 M = 4096: 16 MB in 11 µs, 1.4 TB/s of the H200's ~4.5 —
bench/results/logs/h200-20261202-fp8-stage-profile-s14-*). Each setting is timed by
`triton.testing.do_bench` (L2 cleared between calls) on bf16 tensors of prefill shapes; the
library's setting (BLOCK 1024, 4 warps, ≤ 256 programs, ≥ 8 blocks each) is the first row.
Results are JSON lines under --out.

    PYTHONPATH=src python3 bench/scripts/amax_sweep.py --out $OUT
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import triton

import moekit._replay
from moekit._experts_fp8_kernels import _amax_partials_kernel
from moekit._intmath import cdiv

moekit._replay.enabled = False  # this script patches what the ops read: no replays

SHAPES = [(1024, 2048), (4096, 2048), (16384, 2048), (4096, 4096), (4096, 7168)]
BLOCKS, WARPS, PROGRAMS = (1024, 2048, 4096, 8192), (4, 8), (132, 256, 528, 1024)


def time_setting(x: torch.Tensor, block: int, warps: int, programs: int) -> tuple[float, bool]:
    """(µs, exact) of one setting: the partials' max must equal |x|'s."""
    numel = x.numel()
    programs = max(1, min(programs, cdiv(numel, block)))
    chunk = cdiv(cdiv(numel, programs), block) * block
    partials = torch.empty(cdiv(numel, chunk), dtype=torch.float32, device=x.device)
    run = lambda: _amax_partials_kernel[(partials.numel(),)](x, partials, numel, chunk,
                                                             BLOCK=block, num_warps=warps)
    run()
    exact = bool(partials.max() == x.abs().max().float())
    return triton.testing.do_bench(run, warmup=25, rep=100) * 1e3, exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "amax-sweep.jsonl"), "w") as log:
        for rows, cols in SHAPES:
            x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
            library = (1024, 4, min(256, cdiv(x.numel(), 8 * 1024)))
            for block, warps, programs in [library, *itertools.product(BLOCKS, WARPS, PROGRAMS)]:
                us, exact = time_setting(x, block, warps, programs)
                row = dict(rows=rows, cols=cols, block=block, warps=warps, programs=programs,
                           library=(block, warps, programs) == library, us=round(us, 2),
                           tb_per_s=round(x.numel() * 2 / us / 1e6, 2), exact=exact)
                log.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
