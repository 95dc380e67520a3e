"""Experiment: the 16-bit Gluon GEMM1 at 32-deep K steps in twice the stages
(`gluon_gemm1_16bit(..., block_k=SHALLOW_K)`), or 128-deep ones in half (`--k-step 128`),
against its 64-deep steps.

Prediction (session 25): at granite's mid M the math warpgroups wait on data ~37% of
their time with the producer waiting on free stages too (every stage in flight; stall
sampling with the tile prefetch, bench/NOTES.md session 25). Each math warpgroup holds
about two stages (the one it multiplies, the one whose MMAs are in flight): 64 of 192 KB
at 32 KB stages (narrow columns), 32 of 192 KB at 16 KB ones, so ~25% more bytes in
flight per SM at the same shared memory. If the stream is latency-bound, GEMM1 at
granite M = 512 ~43.5 → ~38 µs; against it, twice the barrier waits, fences and
releases per byte on the math side, which prefill (MMA-bound) would feel.
Measured (session 26): 32-deep steps slower in every cell. Then 128-deep steps (session
26's hypothesis: a copy's short row pieces, 128 bytes of each of BLOCK_N weight rows 2·H
bytes apart, cap the DRAM stream; `tile_read_experiment.py`).

Each cell times GEMM1 alone over one dispatch plan at both column tiles (128, and 64 of
`NARROW_N`) × both K steps, by CUDA-graph replay with L2 read-flushed, four rounds with
the variants' order rotated each round; the 32-deep steps' `inter` must equal the
64-deep steps' bitwise (the same MMAs in the same K order).

    PYTHONPATH=src python3 bench/scripts/k_step_experiment.py --out $OUT [--k-step 128]
        [--cells P:M ...]
"""

from __future__ import annotations

import statistics
import sys

import torch
from half_tile_experiment import (  # this directory: the plan, the command line, the loop
    prefill_plan,
    run_cells,
)

from moekit._gluon_gemm1_16bit import (
    BLOCK_K,
    BLOCK_N,
    DEEP_K,
    NARROW_N,
    SHALLOW_K,
    gluon_gemm1_16bit,
    use_gluon_gemm1_16bit,
)
from moekit._tma import heuristic_sms
from moekit.activation import Activation
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.tuning.heuristic import gluon_gemm1_narrow_columns

CELLS = (
    [("granite-3.0-3b-a800m", m) for m in (512, 768, 1024, 384, 2048, 4096)]
    + [("qwen3-30b-a3b", m) for m in (1024, 4096)]
    + [("olmoe-1b-7b", m) for m in (1024, 4096)]
    + [("mixtral-8x7b", 1024), ("deepseek-v2-lite", 4096)]
)
ROUNDS = 4
OTHER_K = DEEP_K if "--k-step" in sys.argv and sys.argv[sys.argv.index("--k-step") + 1] == "128" \
    else SHALLOW_K
VARIANTS = [(n, k) for n in (BLOCK_N, NARROW_N) for k in (BLOCK_K, OTHER_K)]


def run_cell(name: str, m: int, log) -> dict:
    preset = PRESETS[name]
    dev = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, dev)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, dev)
    act = Activation.parse(preset.activation)
    if not use_gluon_gemm1_16bit(hidden, w.w13, 128, act.kind):
        log(f"{name} M={m}: not a Gluon shape, skipped")
        return {}
    weights, plan, programs, keep = prefill_plan(topk, preset.num_experts, dev)
    inter_size = w.w13.shape[1] // 2
    narrow = gluon_gemm1_narrow_columns(m, preset.num_experts, preset.top_k, inter_size,
                                        heuristic_sms(dev))

    def g1(block_n, block_k):
        return gluon_gemm1_16bit(hidden, w.w13, w.b13, weights, plan, act.kind, act.alpha,
                                 act.limit, False, programs, block_n, block_k)

    row = {"preset": name, "M": m, "library_block_n": NARROW_N if narrow else BLOCK_N}
    for n in (BLOCK_N, NARROW_N):
        row[f"equal_{n}"] = bool(torch.equal(g1(n, OTHER_K)[keep], g1(n, BLOCK_K)[keep]))
    for r in range(ROUNDS):
        for n, k in VARIANTS[r % 4:] + VARIANTS[:r % 4]:
            row.setdefault(f"gemm1_{n}x{k}_us", []).append(
                graph_replay_us(lambda n=n, k=k: g1(n, k), rep_ms=30))
    med = {v: statistics.median(row[f"gemm1_{v[0]}x{v[1]}_us"]) for v in VARIANTS}
    parts = [f"{n}×{k} {med[n, k]:.1f}" for n, k in VARIANTS]
    log(f"{name} M={m} (library: {row['library_block_n']} columns): GEMM1 µs " + ", ".join(parts)
        + f"; 64 ÷ {OTHER_K} deep: {med[BLOCK_N, BLOCK_K] / med[BLOCK_N, OTHER_K]:.3f}× "
        f"(128 cols), {med[NARROW_N, BLOCK_K] / med[NARROW_N, OTHER_K]:.3f}× (64 cols); equal "
        f"{row[f'equal_{BLOCK_N}']}/{row[f'equal_{NARROW_N}']}")
    return row


if __name__ == "__main__":
    if "--k-step" in sys.argv:  # read above; run_cells parses the rest
        at = sys.argv.index("--k-step")
        del sys.argv[at:at + 2]
    sys.exit(run_cells(f"k-step-experiment-{OTHER_K}", CELLS, run_cell))
