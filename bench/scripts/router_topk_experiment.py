"""The layer's decode routing three ways, the GPU's time in CUDA-graph replay (L2 flushed):
`router_topk` (GEMV and routing, one launch) against `router_logits` then `route` (two)
and `F.linear` (cuBLAS) then `route` (two), per preset's router and token count; ids
must match across all three.

    PYTHONPATH=src python3 bench/scripts/router_topk_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from moekit.bench.experiment_files import experiment_meta, write_experiment
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.routing import route, router_logits
from moekit.routing.router_topk import router_topk

PRESET_NAMES = ["qwen3-30b-a3b", "granite-3.0-3b-a800m", "olmoe-1b-7b", "mixtral-8x7b",
                "deepseek-v3"]
TOKENS = [1, 4, 8, 16]


def run_cell(name: str, m: int, weight: torch.Tensor, counter: torch.Tensor) -> dict:
    """One preset's router at m tokens: graph µs of the three ways, ids compared."""
    preset = PRESETS[name]
    k = preset.top_k
    x = torch.randn(m, preset.hidden, device="cuda", dtype=torch.bfloat16)
    calls = {
        "fused": lambda: router_topk(x, weight, k, counter),
        "two_kernels": lambda: route(router_logits(x, weight), k),
        "cublas_route": lambda: route(F.linear(x, weight), k),
    }
    row = {"preset": name, "E": preset.num_experts, "H": preset.hidden, "k": k, "M": m}
    ids = {}
    for label, call in calls.items():
        ids[label] = call().ids
        row[f"{label}_us"] = round(graph_replay_us(call, rep_ms=30), 2)
    row["ids_equal"] = bool(torch.equal(ids["fused"], ids["two_kernels"])
                            and torch.equal(ids["fused"], ids["cublas_route"]))
    row["counter_zero"] = counter.item() == 0
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--stem", default="router-topk-experiment")
    args = parser.parse_args()
    rows = []
    for name in PRESET_NAMES:
        preset = PRESETS[name]
        weight = torch.randn(preset.num_experts, preset.hidden, device="cuda",
                             dtype=torch.bfloat16) / preset.hidden**0.5
        counter = torch.zeros(1, dtype=torch.int32, device="cuda")
        for m in TOKENS:
            rows.append(run_cell(name, m, weight, counter))
            print(rows[-1], flush=True)
    notes = ["- CUDA-graph replay µs, median, L2 flushed; bf16; softmax top-k renormalised; "
             "fused = `router_topk`, two kernels = `router_logits` + `route`, cuBLAS = "
             "`F.linear` + `route`"]
    table = ["| preset | M | fused | two kernels | cuBLAS + route | ids equal | counter 0 |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['preset']} | {r['M']} | {r['fused_us']} | {r['two_kernels_us']} | "
              f"{r['cublas_route_us']} | {r['ids_equal']} | {r['counter_zero']} |" for r in rows]
    write_experiment(args.out, args.stem, experiment_meta(), rows,
                     "The layer's decode routing: one launch against two", notes, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
