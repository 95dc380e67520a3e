"""Experiment: the dispatch plan with pairs ranked by comparison within 256-pair chunks, the
chunk histograms scanned once in a launch of their own and each expert's blocks written
by the program that owns the expert, against the plan that sorted each chunk
(`tl.sort`), had every place program scan all histograms and found each block's expert
by reductions over all bins.

The previous plan is imported from `--baseline` (a directory holding `old_dispatch.py`
and `old_dispatch_kernels.py`, the library's files at that commit). For each cell: the
plan's CUDA-graph replay (L2 cleared, median of 50) and each kernel's CUDA µs
(torch.profiler, mean of 20 eager calls), old and new, the new one also with other
chunk sizes, one-launch limits and experts per program; every plan must equal the old one.

    git show ff3083d:src/moekit/_dispatch_kernels.py > DIR/old_dispatch_kernels.py
    git show ff3083d:src/moekit/dispatch.py \
        | sed s/moekit._dispatch_kernels/old_dispatch_kernels/ > DIR/old_dispatch.py
    PYTHONPATH=src python3 bench/scripts/plan_rank_experiment.py --baseline DIR --out $OUT
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch
from plan_place_experiment import kernel_us
from plan_scan_experiment import replay_us

import moekit._replay
import moekit.dispatch as dispatch
from moekit.bench.inputs import make_tokens
from moekit.bench.presets import PRESETS

moekit._replay.enabled = False  # this script patches what the ops read: no replays

CELLS = [("qwen3-30b-a3b", m) for m in (16, 64, 128, 256, 512, 1024, 4096, 16384)] + [
    ("deepseek-v3", 512), ("deepseek-v3", 4096), ("deepseek-v3", 16384),
    ("mixtral-8x7b", 4096), ("mixtral-8x7b", 16384), ("gpt-oss-120b", 4096)]
# (label, constants of `moekit.dispatch` changed); the first is the library's.
VARIANTS = [("new", {}), ("chunk 128", {"_CHUNK": 128}), ("fused ≤ 2048", {"_FUSED_PAIRS": 2048}),
            ("fused ≤ 1024", {"_FUSED_PAIRS": 1024}),
            ("2 experts/program", {"_EXPERTS_PER_PROGRAM": 2}),
            ("8 experts/program", {"_EXPERTS_PER_PROGRAM": 8})]
FIELDS = ("sorted_pairs", "block_experts", "expert_offsets", "pair_slots", "tiles")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    sys.path.insert(0, args.baseline)
    import old_dispatch

    os.makedirs(args.out, exist_ok=True)
    library = {name: getattr(dispatch, name) for _, knobs in VARIANTS for name in knobs}
    with open(os.path.join(args.out, "plan-rank-experiment.jsonl"), "w") as log:
        for name, m in CELLS:
            preset = PRESETS[name]
            _, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
            old = functools.partial(old_dispatch.dispatch_plan, topk.ids, preset.num_experts,
                                    64, tile_m=128)
            expected = old()
            runs = [("old", old, None)] + [
                (label, functools.partial(dispatch.dispatch_plan, topk.ids,
                                          preset.num_experts, 64, tile_m=128), knobs)
                for label, knobs in VARIANTS]
            for label, call, knobs in runs:
                for knob, value in {**library, **(knobs or {})}.items():
                    setattr(dispatch, knob, value)
                plan = call()
                row = dict(preset=name, M=m, pairs=m * preset.top_k, variant=label,
                           identical=all(torch.equal(getattr(plan, f), getattr(expected, f))
                                         for f in FIELDS),
                           plan_us=round(replay_us(call), 2), **kernel_us(call))
                log.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
            for knob, value in library.items():
                setattr(dispatch, knob, value)


if __name__ == "__main__":
    main()
