"""Experiment: the Gluon GEMMs loading each tile's indices a tile ahead
(`moekit._gluon.PREFETCH_TILES`, `PREFETCH_TILES_FP8`) against loading them at the tile's
start.

Prediction (session 25): Nsight Compute's stall sampling of granite M = 512's 16-bit
GEMM1 (bench/results/logs/h200-20261203-ncu-granite-gemm1-stalls-s25-37fe013.md) put
~20% of the producer warpgroup's samples on two dependent loads at every tile start
(the work entry, then the expert and the 128 slots' pairs) while the math warpgroups
waited on data ~38% of theirs. Loaded a tile ahead, the producer issues the tile's first
copies at once: GEMM1 there ~45 → ~40 µs; GEMM2 (8 K steps a tile at granite, against
GEMM1's 24) gains more in proportion; prefill (32+ K steps) little.

Each cell times, in interleaved rounds, GEMM1 alone, GEMM2 alone (16-bit Gluon kernels,
over one dispatch plan; GEMM1 at the column tile the library picks) and the whole layer,
prefetch on and off (ABBA over four rounds), by CUDA-graph replay with L2 read-flushed;
outputs must be bitwise equal on and off. Cells named `fp8_<scheme>/<preset>` time the
fp8 layer (its Gluon GEMMs share the producers).

    PYTHONPATH=src python3 bench/scripts/tile_prefetch_experiment.py --out $OUT [--cells P:M ...]
"""

from __future__ import annotations

import sys

import torch
from half_tile_experiment import (  # this directory: the plan, the command line, the loop
    prefill_plan,
    run_cells,
)

import moekit
import moekit._replay
from moekit import _gluon
from moekit._gluon_gemm1_16bit import (
    BLOCK_N,
    NARROW_N,
    gluon_gemm1_16bit,
    use_gluon_gemm1_16bit,
)
from moekit._gluon_gemm2_16bit import gluon_gemm2_16bit, use_gluon_gemm2_16bit
from moekit._tma import heuristic_sms
from moekit.activation import Activation
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.tuning.heuristic import gluon_gemm1_narrow_columns

moekit._replay.enabled = False  # this script patches what the ops read: no replays

# The most informative first (results are saved after every cell).
CELLS = (
    [("granite-3.0-3b-a800m", m) for m in (512, 768, 1024, 384, 256)]
    + [("qwen3-30b-a3b", 4096), ("mixtral-8x7b", 4096), ("olmoe-1b-7b", 4096),
       ("deepseek-v2-lite", 4096), ("gpt-oss-120b", 4096), ("deepseek-v3", 4096)]
    + [(f"fp8_{s}/{name}", m) for s in ("tensor", "block")
       for name, m in (("granite-3.0-3b-a800m", 512), ("qwen3-30b-a3b", 4096),
                       ("mixtral-8x7b", 4096))]
    + [("granite-3.0-3b-a800m", m) for m in (128, 2048, 4096)]
    + [("qwen3-30b-a3b", m) for m in (512, 1024, 16384)]
    + [("olmoe-1b-7b", 1024), ("mixtral-8x7b", 1024)]
)
ROUNDS = 4


def _set(prefetch: bool | None) -> None:
    """Both kinds' prefetch on or off; None: the library's defaults."""
    _gluon.PREFETCH_TILES = True if prefetch is None else prefetch
    _gluon.PREFETCH_TILES_FP8 = False if prefetch is None else prefetch


def timed(prefetch: bool, fn) -> float:
    """Graph replay µs of `fn`, captured with the prefetch on or off."""
    _set(prefetch)
    try:
        return graph_replay_us(fn, rep_ms=30)
    finally:
        _set(None)


def same(fn, keep) -> bool:
    """Whether `fn`'s output (its rows `keep`, when given) is bitwise the same with
    prefetch on and off."""
    _set(False)
    try:
        off = fn().clone()
        _set(True)
        on = fn()
    finally:
        _set(None)
    if keep is not None:
        on, off = on[keep], off[keep]
    return bool(torch.equal(on, off))


def run_cell(name: str, m: int, log) -> dict:
    scheme = None
    if name.startswith("fp8_"):
        scheme, name = name.split("/", 1)
    preset = PRESETS[name]
    dev = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, dev)
    if scheme:
        w = quantize_experts(w, scheme)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, dev)
    act = Activation.parse(preset.activation)

    def layer():
        if scheme:
            return moekit.fused_experts_fp8(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                            scheme=scheme, activation=preset.activation,
                                            b13=w.b13, b2=w.b2)
        return moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                    activation=preset.activation, b13=w.b13, b2=w.b2)

    stages = {"layer": layer}
    keep = None  # the plan's valid slots, where a GEMM alone writes plan-order rows
    if not scheme:
        weights, plan, programs, keep = prefill_plan(topk, preset.num_experts, dev)
        inter_size = w.w13.shape[1] // 2
        if use_gluon_gemm1_16bit(hidden, w.w13, 128, act.kind):
            narrow = gluon_gemm1_narrow_columns(m, preset.num_experts, preset.top_k,
                                                inter_size, heuristic_sms(dev))
            block_n = NARROW_N if narrow else BLOCK_N
            stages["gemm1"] = lambda: gluon_gemm1_16bit(
                hidden, w.w13, w.b13, weights, plan, act.kind, act.alpha, act.limit, False,
                programs, block_n)
        if use_gluon_gemm2_16bit(w.w2, 128, plan.num_pairs):
            inter = torch.randn((plan.capacity, inter_size), device=dev).to(torch.bfloat16)
            stages["gemm2"] = lambda: gluon_gemm2_16bit(inter, w.w2, w.b2, weights, plan,
                                                        programs)
    row = {"preset": name, "M": m, "scheme": scheme or "bf16"}
    for stage, fn in stages.items():
        row[f"{stage}_equal"] = same(fn, None if stage == "layer" else keep)
    for round_ in range(ROUNDS):
        for stage, fn in stages.items():
            # ABBA: prefill cells slow down as the GPU warms, which alone would favour
            # whichever variant runs first.
            for prefetch in ((False, True) if round_ % 2 == 0 else (True, False)):
                key = f"{stage}_{'on' if prefetch else 'off'}_us"
                row.setdefault(key, []).append(timed(prefetch, fn))
    parts = []
    for stage in stages:
        off, on = min(row[f"{stage}_off_us"]), min(row[f"{stage}_on_us"])
        parts.append(f"{stage} {off:.1f} → {on:.1f} µs ({off / on:.3f}×"
                     f"{'' if row[f'{stage}_equal'] else ', NOT EQUAL'})")
    log(f"{row['scheme']} {name} M={m}: " + "; ".join(parts))
    return row


if __name__ == "__main__":
    sys.exit(run_cells("tile-prefetch-experiment", CELLS, run_cell))
