"""Memory-bound mid M (16–64 rows per expert): the 16-bit Gluon GEMMs against the Triton ones.

Where an active expert receives 16–64 rows the heuristic takes 32- or 64-row tiles, which
run the Triton GEMMs (cp.async weight loads, 3–4 stages); the warp-specialised Gluon GEMMs
(TMA loads, 4 stages of 48 KB, a producer warpgroup running ahead) serve only 128-row
tiles, with a run's odd last 64 rows as a tail tile. These cells stream every expert's
weights once, so the weight stream sets their pace, and vLLM's fused MoE was ahead of
moekit at M = 256 on olmoe and deepseek-v2-lite (PERF.md's H200 table, session 17). This
times the whole `fused_experts` call with the configuration it takes today (tuned table or
heuristic) against 128-row tiles with 64-row tails (every expert's rows then one tail
tile: both GEMMs Gluon), graph replay, L2 read-flushed, four rounds in ABBA order, and
reports the two outputs' relative difference.

    PYTHONPATH=src python3 bench/scripts/mid_m_gluon_experiment.py --out $OUT
"""

from __future__ import annotations

import sys

import torch
from half_tile_experiment import run_cells  # this directory: the command line and rows

import moekit
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.experts import _select_config
from moekit.tuning.heuristic import tiles_for_block_m

CELLS = (
    [("olmoe-1b-7b", m) for m in (128, 256, 384)]
    + [("deepseek-v2-lite", m) for m in (256, 512, 640)]
    + [("qwen3-30b-a3b", m) for m in (256, 512, 768)]
    + [("granite-3.0-3b-a800m", m) for m in (192, 256)]
    + [("mixtral-8x7b", m) for m in (128, 192)]
)


def run_cell(name: str, m: int, log) -> dict:
    preset = PRESETS[name]
    dev = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, dev)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, dev)
    shipped = _select_config(hidden, preset.num_experts, preset.top_k, preset.inter)
    gluon = tiles_for_block_m(128)
    if shipped.block_m == 128:
        log(f"{name} M={m}: already 128-row tiles, skipped")
        return {}

    def layer(config):
        return moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights, b13=w.b13,
                                    b2=w.b2, activation=preset.activation, config=config)

    a, b = layer(shipped).float(), layer(gluon).float()
    row = {"preset": name, "M": m, "shipped": shipped.as_ints(), "gluon": gluon.as_ints(),
           "rel_diff": float((a - b).norm() / a.norm())}
    for order in ((shipped, gluon), (gluon, shipped), (shipped, gluon), (gluon, shipped)):
        for config in order:
            key = "shipped_us" if config is shipped else "gluon_us"
            row.setdefault(key, []).append(graph_replay_us(lambda c=config: layer(c)))
    best_a, best_b = min(row["shipped_us"]), min(row["gluon_us"])
    log(f"{name} M={m}: block_m {shipped.block_m} {best_a:.1f} µs → 128/64 Gluon "
        f"{best_b:.1f} µs ({best_a / best_b:.3f}×); rel diff {row['rel_diff']:.1e}")
    return row


if __name__ == "__main__":
    sys.exit(run_cells("mid-m-gluon-experiment", CELLS, run_cell))
