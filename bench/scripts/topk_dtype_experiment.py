"""What transformers' top-k operands cost at decode: `fused_experts(_fp8)` on int64 ids and
bf16 router weights (as transformers hands them) against int32 ids and float32 weights,
CUDA-graph replay (the GPU's own time, L2 flushed) and eager calls (host µs per call).

On main the int64 call carries one cast launch (`moekit._topk_cast`); on a version whose
direct-path kernels read those dtypes themselves it should cost what the int32 call does.
Outputs must be bitwise equal between the two operand kinds.

    PYTHONPATH=src python3 bench/scripts/topk_dtype_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import moekit
from moekit.bench.experiment_files import experiment_meta, write_experiment
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us

CELLS = [("qwen3-30b-a3b", 1, "bf16"), ("qwen3-30b-a3b", 4, "bf16"),
         ("granite-3.0-3b-a800m", 1, "bf16"), ("olmoe-1b-7b", 1, "bf16"),
         ("qwen3-30b-a3b", 1, "fp8_block"), ("qwen3-30b-a3b", 64, "bf16")]
BLOCKS, BLOCK = 15, 20


def host_us(call) -> float:
    """Median over blocks of back-to-back eager calls: host µs per call."""
    for _ in range(5):  # compiles; plain, recorded and replayed calls
        call()
    torch.cuda.synchronize()
    samples = []
    for _ in range(BLOCKS):
        start = time.perf_counter()
        for _ in range(BLOCK):
            call()
        samples.append((time.perf_counter() - start) / BLOCK * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


def calls(name: str, m: int, dtype: str, device: str = "cuda") -> dict:
    """Per operand kind, (an eager call of the cell, its output buffer): the same weights,
    tokens and routing, the router weights bf16 values in both (float32-held for int32)."""
    preset = PRESETS[name] if isinstance(name, str) else name
    device = torch.device(device)
    w = make_weights(preset, torch.bfloat16, device)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, device)
    weights16 = topk.weights.bfloat16()
    operands = {"int32": (topk.ids.int(), weights16.float()),
                "int64": (topk.ids.long(), weights16)}
    q = None if dtype == "bf16" else quantize_experts(w, dtype)
    made = {}
    for kind, (ids, weights) in operands.items():
        out = torch.empty_like(hidden)
        if q is None:
            call = (lambda ids=ids, weights=weights, out=out: moekit.fused_experts(
                hidden, w.w13, w.w2, ids, weights, activation=preset.activation, b13=w.b13,
                b2=w.b2, out=out))
        else:
            call = (lambda ids=ids, weights=weights, out=out: moekit.fused_experts_fp8(
                hidden, q.w13, q.w2, ids, weights, scheme=dtype, activation=preset.activation,
                b13=q.b13, b2=q.b2, out=out))
        made[kind] = (call, out)
    return made


def run_cell(name: str, m: int, dtype: str) -> dict:
    row = {"preset": name, "M": m, "dtype": dtype}
    made = calls(name, m, dtype)
    for kind, (call, _) in made.items():
        row[f"{kind}_host_us"] = round(host_us(call), 1)
        row[f"{kind}_graph_us"] = round(graph_replay_us(call, rep_ms=30), 2)
    row["graph_ratio"] = round(row["int64_graph_us"] / row["int32_graph_us"], 3)
    row["bitwise_equal"] = bool(torch.equal(made["int32"][1].view(torch.int16),
                                            made["int64"][1].view(torch.int16)))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--stem", default="topk-dtype-experiment")
    args = parser.parse_args()
    rows = []
    for cell in CELLS:
        rows.append(run_cell(*cell))
        print(rows[-1], flush=True)
    notes = ["- graph = CUDA-graph replay µs (L2 flushed, median); host = eager host µs per "
             f"call (median of {BLOCKS} blocks of {BLOCK}); the router weights are bf16 "
             "values in both calls, so outputs must be bitwise equal"]
    table = ["| preset | M | dtype | graph int32 | graph int64 | ratio | host int32 | "
             "host int64 | bitwise |", "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['preset']} | {r['M']} | {r['dtype']} | {r['int32_graph_us']} | "
              f"{r['int64_graph_us']} | {r['graph_ratio']} | {r['int32_host_us']} | "
              f"{r['int64_host_us']} | {r['bitwise_equal']} |" for r in rows]
    write_experiment(args.out, args.stem, experiment_meta(), rows,
                     "int64 ids and bf16 router weights against int32 and float32", notes,
                     table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
