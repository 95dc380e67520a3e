"""Mid-M GEMM1 of narrow layers: the 16-bit Gluon GEMM1 at 64-column tiles.

Granite (40 experts, I = 512) at M = 128–512 runs its Gluon GEMM1 at ~2.5–2.8 TB/s of
weights whatever its rows (45.6 µs at M = 128, 50.5 at 512; 126 MB of w13:
`h200-20261203-half-tile-experiment-s23.md`): it is bound by streaming w13, and 160
tiles of 128 gate + 128 up rows leave 28 SMs streaming a second round alone. Half-high
row tiles (that file) did not help: each still streams the same weight rows. Tiles of 64
gate + 64 up columns stream half the rows each, twice as many of them, 6 stages deep.
This times GEMM1 at both column tiles (graph replay, L2 read-flushed, two rounds) and
checks the valid rows of `inter` bitwise equal.

    PYTHONPATH=src python3 bench/scripts/narrow_columns_experiment.py --out $OUT
"""

from __future__ import annotations

import sys

import torch
from half_tile_experiment import SHARDS, run_cells  # this directory: the shards, the loop

from moekit._gluon_gemm1_16bit import BLOCK_N, NARROW_N, gluon_gemm1_16bit, use_gluon_gemm1_16bit
from moekit._tma import persistent_programs
from moekit.activation import Activation
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.dispatch import dispatch_plan

CELLS = (
    [("granite-3.0-3b-a800m", m) for m in (128, 256, 384, 512, 768, 1024, 1536, 2048, 4096)]
    + [("olmoe-1b-7b/tp4", m) for m in (256, 512, 1024, 2048)]
    + [("qwen3-30b-a3b/tp2", m) for m in (512, 1024, 2048)]
    + [("mixtral-8x7b/tp8", m) for m in (512, 1024, 2048)]
    + [("qwen3-30b-a3b", m) for m in (512, 1024, 2048, 4096)]
    + [("olmoe-1b-7b", m) for m in (512, 1024, 2048)]
    + [("deepseek-v2-lite", m) for m in (512, 1024)]
)


def run_cell(name: str, m: int, log) -> dict:
    preset = SHARDS.get(name) or PRESETS[name]
    dev = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, dev)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, dev)
    ids = topk.ids.to(torch.int32)
    weights = topk.weights.float().reshape(-1)
    act = Activation.parse(preset.activation)
    if not use_gluon_gemm1_16bit(hidden, w.w13, 128, act.kind):
        log(f"{name} M={m}: not a Gluon shape, skipped")
        return {}
    plan = dispatch_plan(ids, preset.num_experts, 64, tile_m=128, backend="triton")
    programs = persistent_programs(dev)

    def g1(block_n):
        return gluon_gemm1_16bit(hidden, w.w13, w.b13, weights, plan, act.kind, act.alpha,
                                 act.limit, False, programs, block_n)

    keep = plan.sorted_pairs < plan.num_pairs
    row = {"preset": name, "M": m, "row_tiles": int(plan.tiles[-1]),
           "equal": bool(torch.equal(g1(BLOCK_N)[keep], g1(NARROW_N)[keep]))}
    for _ in range(2):
        for n in (BLOCK_N, NARROW_N):
            row.setdefault(f"gemm1_{n}_us", []).append(graph_replay_us(lambda n=n: g1(n)))
    wide, narrow = min(row[f"gemm1_{BLOCK_N}_us"]), min(row[f"gemm1_{NARROW_N}_us"])
    log(f"{name} M={m}: {row['row_tiles']} row tiles; GEMM1 {wide:.1f} → {narrow:.1f} µs "
        f"({wide / narrow:.3f}×); equal {row['equal']}")
    return row


if __name__ == "__main__":
    sys.exit(run_cells("narrow-columns-experiment", CELLS, run_cell))
