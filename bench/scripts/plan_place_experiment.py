"""Experiment: where the dispatch plan's place kernel spends its time.

Session 14 found the place kernel's scan over chunk histograms is not its cost (qwen3
M = 16384: 50 µs for the whole plan). Left: each program's `tl.sort` of its chunk
(bitonic, CHUNK = 512 at M = 4096, 2048 at 16384) and the block fill. This varies the
chunk size (`moekit.dispatch._chunk_size`: the sort's length and the number of
programs, hence the scan's rows) and the place kernel's warps, and reports per kernel
CUDA µs (torch.profiler, mean of 20 eager calls) and the plan's graph replay (L2
cleared). The plans must be identical to the library's.

    PYTHONPATH=src python3 bench/scripts/plan_place_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch
from plan_scan_experiment import replay_us
from torch.profiler import ProfilerActivity, profile

import moekit
import moekit.dispatch as dispatch
from moekit.bench.inputs import make_tokens
from moekit.bench.presets import PRESETS

CELLS = [("qwen3-30b-a3b", 1024), ("qwen3-30b-a3b", 4096), ("qwen3-30b-a3b", 16384),
         ("deepseek-v3", 4096), ("mixtral-8x7b", 4096)]
CHUNKS = (None, 256, 512, 1024, 2048, 4096)  # None: the library's choice
WARPS = (4, 8)
FIELDS = ("sorted_pairs", "block_experts", "expert_offsets", "pair_slots", "tiles")
LIBRARY_CHUNK = dispatch._chunk_size
PLACE = dispatch._place_pairs_kernel


class WithWarps:
    """`_place_pairs_kernel` launched with `warps` warps."""

    def __init__(self, warps: int):
        self.warps = warps

    def __getitem__(self, grid):
        return lambda *args, **kwargs: PLACE[grid](*args, num_warps=self.warps, **kwargs)


def kernel_us(fn, calls: int = 20) -> dict[str, float]:
    """Mean CUDA µs per call of each kernel `fn` launches."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key: round(e.device_time_total / calls, 2) for e in prof.key_averages()
            if "pairs_kernel" in e.key or "counts_kernel" in e.key}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "plan-place-experiment.jsonl"), "w") as log:
        for name, m in CELLS:
            preset = PRESETS[name]
            _, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
            call = functools.partial(moekit.dispatch_plan, topk.ids, preset.num_experts,
                                     64, tile_m=128)
            reference = call()
            for chunk in CHUNKS:
                for warps in WARPS:
                    dispatch._chunk_size = (LIBRARY_CHUNK if chunk is None
                                            else lambda n, c=chunk: c)
                    dispatch._place_pairs_kernel = WithWarps(warps)
                    plan = call()
                    row = dict(preset=name, M=m, chunk=chunk or LIBRARY_CHUNK(m * preset.top_k),
                               library=chunk is None, warps=warps,
                               identical=all(torch.equal(getattr(plan, f), getattr(reference, f))
                                             for f in FIELDS),
                               plan_us=round(replay_us(call), 2), **kernel_us(call))
                    log.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    dispatch._chunk_size = LIBRARY_CHUNK
    dispatch._place_pairs_kernel = PLACE


if __name__ == "__main__":
    main()
