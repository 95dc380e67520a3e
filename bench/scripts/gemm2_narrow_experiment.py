"""Experiment: the 16-bit Gluon GEMM2 at narrow tiles (two 64-column halves in 6 stages,
`gluon_gemm2_16bit(..., block_n=NARROW_N)`) against its wide ones (two 128-column halves
in 4 stages).

Prediction (session 26): stall sampling of granite's GEMM2 at M = 512 (bench/results/logs/
h200-20261203-ncu-granite-gemm2-stalls-s26.md) has the producer waiting on free stages for
~58% of its samples and the math warpgroups waiting on data for ~45% of theirs. With 8 K
steps a tile (I = 512) a ring of 4 wide stages holds half of the next tile during an
epilogue; 6 narrow stages hold three quarters, so less of each K loop waits on loads
issued late. Against it: twice the tiles (twice the epilogues' fixed costs, A read from L2
once per half-width tile) and the same round count (granite M = 512: 1.8 → 3.6 rounds).
If the exposed latency dominates, granite's GEMM2 ~28 → ~24 µs at M = 384–1024; prefill
(12+ K steps, MMA-bound) should lose.

Each cell times GEMM2 alone over one dispatch plan (its input made once by the library's
GEMM1) and the layer with the GEMM2 at either width, by CUDA-graph replay with L2
read-flushed, four rounds in ABBA order; the narrow tiles' output must equal the wide
ones' bitwise (the same MMAs in the same K order).

    PYTHONPATH=src python3 bench/scripts/gemm2_narrow_experiment.py --out $OUT [--cells P:M ...]
"""

from __future__ import annotations

import statistics
import sys

import torch
from half_tile_experiment import (  # this directory: the plan, the command line, the loop
    prefill_plan,
    run_cells,
)

import moekit
import moekit.experts
from moekit._gluon_gemm1_16bit import NARROW_N as GEMM1_NARROW_N
from moekit._gluon_gemm1_16bit import gluon_gemm1_16bit, use_gluon_gemm1_16bit
from moekit._gluon_gemm2_16bit import (
    BLOCK_N,
    NARROW_N,
    gluon_gemm2_16bit,
    use_gluon_gemm2_16bit,
)
from moekit._tma import heuristic_sms
from moekit.activation import Activation
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.tuning.heuristic import gluon_gemm1_narrow_columns

CELLS = (
    [("granite-3.0-3b-a800m", m) for m in (512, 768, 1024, 384, 256, 2048, 4096)]
    + [("qwen3-30b-a3b", m) for m in (1024, 4096)]
    + [("olmoe-1b-7b", m) for m in (1024, 4096)]
    + [("deepseek-v2-lite", 4096), ("mixtral-8x7b", 1024)]
)
ROUNDS = 4
WIDTHS = (BLOCK_N, NARROW_N)


def run_cell(name: str, m: int, log) -> dict:
    preset = PRESETS[name]
    dev = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, dev)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, dev)
    act = Activation.parse(preset.activation)
    if not (use_gluon_gemm1_16bit(hidden, w.w13, 128, act.kind)
            and use_gluon_gemm2_16bit(w.w2, 128)):
        log(f"{name} M={m}: not a Gluon shape, skipped")
        return {}
    weights, plan, programs, keep = prefill_plan(topk, preset.num_experts, dev)
    narrow1 = gluon_gemm1_narrow_columns(m, preset.num_experts, preset.top_k,
                                         w.w13.shape[1] // 2, heuristic_sms(dev))
    inter = gluon_gemm1_16bit(hidden, w.w13, w.b13, weights, plan, act.kind, act.alpha,
                              act.limit, False, programs,
                              GEMM1_NARROW_N if narrow1 else 128)
    out = torch.empty_like(hidden)
    real = moekit.experts.gluon_gemm2_16bit

    def g2(block_n):
        return gluon_gemm2_16bit(inter, w.w2, w.b2, weights, plan, programs, block_n)

    def layer(block_n):
        moekit.experts.gluon_gemm2_16bit = lambda *args: real(*args, block_n=block_n)
        try:
            return moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                        activation=act, b13=w.b13, b2=w.b2, out=out)
        finally:
            moekit.experts.gluon_gemm2_16bit = real

    row = {"preset": name, "M": m, "tiles_wide": int(plan.tiles[-1])}
    row["gemm2_equal"] = bool(torch.equal(g2(NARROW_N)[keep], g2(BLOCK_N)[keep]))
    row["layer_equal"] = bool(torch.equal(layer(NARROW_N).clone(), layer(BLOCK_N)))
    for r in range(ROUNDS):
        for n in (WIDTHS if r % 2 == 0 else WIDTHS[::-1]):
            row.setdefault(f"gemm2_{n}_us", []).append(
                graph_replay_us(lambda n=n: g2(n), rep_ms=30))
            moekit.experts.gluon_gemm2_16bit = lambda *args, n=n: real(*args, block_n=n)
            try:  # captured with this width; replays keep it
                row.setdefault(f"layer_{n}_us", []).append(graph_replay_us(
                    lambda: moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                                 activation=act, b13=w.b13, b2=w.b2, out=out),
                    rep_ms=30))
            finally:
                moekit.experts.gluon_gemm2_16bit = real
    med = {k: statistics.median(v) for k, v in row.items() if k.endswith("_us")}
    log(f"{name} M={m}: GEMM2 wide {med['gemm2_128_us']:.1f} narrow {med['gemm2_64_us']:.1f} µs "
        f"({med['gemm2_128_us'] / med['gemm2_64_us']:.3f}×); layer wide "
        f"{med['layer_128_us']:.1f} narrow {med['layer_64_us']:.1f} "
        f"({med['layer_128_us'] / med['layer_64_us']:.3f}×); equal "
        f"{row['gemm2_equal']}/{row['layer_equal']}")
    return row


if __name__ == "__main__":
    sys.exit(run_cells("gemm2-narrow-experiment", CELLS, run_cell))
