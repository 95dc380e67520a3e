"""Decode's direct path with GEMM2 launched dependent on GEMM1 (programmatic dependent launch).

Session 26's decode floors: two launches stream the same bytes 2.0–2.7 µs slower than one
(`h200-20261203-decode-floor-experiment-s26.md`). With `moekit._pdl` GEMM1's programs let
GEMM2 launch as soon as they have all started, and GEMM2 reads its ids and router weights,
then waits (`griddepcontrol.wait`) before reading GEMM1's output: its launch and
placement hide under GEMM1's tail, and no weight is read early (session 3's PDL chain also
prefetched w2 into L2 while GEMM1 streamed w13, and lost 1–17%). This times the whole
`fused_experts` call at the direct path's cells with PDL on and off, graph replay, L2
read-flushed, four rounds in ABBA order, and checks the outputs bitwise equal.

    PYTHONPATH=src python3 bench/scripts/direct_pdl_experiment.py --out $OUT
"""

from __future__ import annotations

import sys

import torch
from half_tile_experiment import run_cells  # this directory: the command line and rows

import moekit
import moekit._pdl
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.experts import _select_config

CELLS = ([(name, m) for name in ("qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite",
                                 "granite-3.0-3b-a800m", "gpt-oss-120b", "deepseek-v3")
          for m in (1, 2, 4)] + [("mixtral-8x7b", 1)])


def run_cell(name: str, m: int, log) -> dict:
    preset = PRESETS[name]
    dev = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, dev)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, dev)
    config = _select_config(hidden, preset.num_experts, preset.top_k, preset.inter)
    if not config.direct:
        log(f"{name} M={m}: not the direct path, skipped")
        return {}

    def layer(pdl: bool):
        moekit._pdl.ENABLED = pdl
        try:
            return moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights, b13=w.b13,
                                        b2=w.b2, activation=preset.activation, config=config)
        finally:
            moekit._pdl.ENABLED = True

    row = {"preset": name, "M": m, "config": config.as_ints(),
           "equal": bool(torch.equal(layer(False), layer(True)))}
    for order in ((False, True), (True, False), (False, True), (True, False)):
        for pdl in order:
            row.setdefault(f"pdl_{int(pdl)}_us", []).append(graph_replay_us(
                lambda p=pdl: layer(p)))
    off, on = min(row["pdl_0_us"]), min(row["pdl_1_us"])
    log(f"{name} M={m}: two launches {off:.1f} µs → PDL {on:.1f} µs ({off / on:.3f}×); "
        f"equal {row['equal']}")
    return row


if __name__ == "__main__":
    sys.exit(run_cells("direct-pdl-experiment", CELLS, run_cell))
