"""Experiment: how much of a prefill cell the plan's padding rows cost — the ceiling of
any padding lever (tail tiles, mixed 128/64-row work lists) before building one.

On the cells where the heuristic takes 128-row tiles at ~256 rows per expert, each
expert's run is padded to a multiple of 128, ~19% of the slots (bench/NOTES.md, v3
outcome). This times `fused_experts` (CUDA-graph replay) under the bench's random
balanced routing and under an exactly even routing, pair (m, j) → expert (m·k + j) mod E,
which gives every expert M·k/E rows — a multiple of 128 on these cells, so no padding.
Same shapes, same FLOPs of real rows; the time difference is what padding (plus the
routing's uneven spread) costs. It also records the slots the random draw's plan uses
at 128- and 64-row padding, for the gain a 64-granular plan could reach at most.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/padding_ceiling_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import moekit
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.dispatch import dispatch_plan

# (preset, M): every one has M·k/E = 256 or 512 rows per expert.
CELLS = [("qwen3-30b-a3b", 4096), ("qwen3-30b-a3b", 8192), ("olmoe-1b-7b", 2048),
         ("mixtral-8x7b", 1024), ("gpt-oss-120b", 8192), ("deepseek-v3", 8192)]


def even_ids(num_tokens: int, top_k: int, num_experts: int, device) -> torch.Tensor:
    """Pair (m, j) → (m·k + j) mod E: distinct within a token, M·k/E rows per expert."""
    pairs = torch.arange(num_tokens * top_k, device=device, dtype=torch.int32)
    return (pairs % num_experts).reshape(num_tokens, top_k)


def used_slots(ids: torch.Tensor, num_experts: int, block_m: int) -> int:
    plan = dispatch_plan(ids, num_experts, block_m)
    return int(plan.expert_offsets[num_experts].item())


def time_cell(name: str, m: int, rep_ms: float) -> dict:
    preset = PRESETS[name]
    device = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, device)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, device)
    ids_even = even_ids(m, preset.top_k, preset.num_experts, device)

    def layer(ids):
        return lambda: moekit.fused_experts(hidden, w.w13, w.w2, ids, topk.weights,
                                            activation=preset.activation, b13=w.b13, b2=w.b2)
    random_us = graph_replay_us(layer(topk.ids), rep_ms)
    even_us = graph_replay_us(layer(ids_even), rep_ms)
    pairs = m * preset.top_k
    return {"device": torch.cuda.get_device_name(), "preset": name, "M": m,
            "git_commit": os.environ.get("MOEKIT_GIT_COMMIT"),
            "random_us": round(random_us, 1), "even_us": round(even_us, 1),
            "even_speedup": round(random_us / even_us, 3), "pairs": pairs,
            "random_slots_128": used_slots(topk.ids, preset.num_experts, 128),
            "random_slots_64": used_slots(topk.ids, preset.num_experts, 64),
            "even_slots_128": used_slots(ids_even, preset.num_experts, 128)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rep-ms", type=float, default=30)
    args = parser.parse_args()
    path = os.path.join(args.out, "padding-ceiling-experiment.jsonl")
    for name, m in CELLS:
        row = time_cell(name, m, args.rep_ms)
        print(json.dumps(row), flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
