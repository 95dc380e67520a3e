"""Experiment: the dispatch plan's time with the place kernel's scan over chunk histograms
done one row per step (as before session 14) or several (`moekit.dispatch._SCAN_VALUES`).

Every place program sums all chunks' histograms (qwen3 M = 4096: 64 chunks of 256 bins)
before it places its own chunk; one row per step leaves one load in flight. Times
`moekit.dispatch_plan` (the count and place launches) by CUDA-graph replay, L2 cleared
before each replay, for prefill presets' routing; the plans must be identical.

    PYTHONPATH=src python3 bench/scripts/plan_scan_experiment.py --out $OUT

Since session 16 the place kernel no longer scans the histograms: a scan launch of its
own does (above 4096 pairs), and `_SCAN_VALUES` sets that kernel's values per step. Run at
a later commit, this script varies that step instead; `replay_us` is shared with the plan
experiments after it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch

import moekit
import moekit.dispatch
from moekit.bench.inputs import make_tokens
from moekit.bench.presets import PRESETS

CELLS = [("qwen3-30b-a3b", 1024), ("qwen3-30b-a3b", 4096), ("qwen3-30b-a3b", 16384),
         ("deepseek-v3", 4096), ("mixtral-8x7b", 4096)]
SCAN_VALUES = {"one row": 1, "8 rows (library)": 2048, "16 rows": 4096}
REPLAYS = 50


def replay_us(fn) -> float:
    """Median µs of `fn` captured in a CUDA graph, L2 cleared before each replay."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(REPLAYS):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    presets = PRESETS
    library = moekit.dispatch._SCAN_VALUES
    with open(os.path.join(args.out, "plan-scan-experiment.jsonl"), "w") as log:
        for name, m in CELLS:
            preset = presets[name]
            _, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
            plans, row = {}, dict(preset=name, M=m)
            for label, values in SCAN_VALUES.items():
                moekit.dispatch._SCAN_VALUES = values
                call = functools.partial(moekit.dispatch_plan, topk.ids, preset.num_experts,
                                         128, tile_m=256)
                plans[label] = call()
                row[label] = round(replay_us(call), 2)
            first = next(iter(plans.values()))
            row["identical"] = all(
                torch.equal(getattr(p, f), getattr(first, f)) for p in plans.values()
                for f in ("sorted_pairs", "block_experts", "expert_offsets", "pair_slots",
                          "tiles"))
            log.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    moekit.dispatch._SCAN_VALUES = library


if __name__ == "__main__":
    main()
