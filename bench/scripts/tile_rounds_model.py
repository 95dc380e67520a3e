"""How evenly the persistent Gluon GEMM1 spreads its tiles over the SMs: a CPU model.

Each program of the persistent grid takes tiles round-robin (`tile_coords`: row tile
major when one expert's w13 fits L2). A whole tile costs 1, a tail tile (a run's odd last
64-row block) `--tail-cost`; the busiest SM's load against the average says how much a
better split of the work could win. Three orders: round-robin (as the kernels run),
snake (odd rounds reversed) and greedy longest-first (a dynamic scheduler's best case).
Routing is drawn as `moekit bench` draws it (on the CPU generator here).

    PYTHONPATH=src python3 bench/scripts/tile_rounds_model.py
"""

from __future__ import annotations

import argparse
import heapq
import math

import torch
from half_tile_experiment import SHARDS  # this directory: the tensor-parallel shards

from moekit.bench.inputs import make_tokens
from moekit.bench.presets import PRESETS
from moekit.tuning.heuristic import HOPPER_SMS, gluon_gemm1_narrow_columns

CELLS = (
    [("granite-3.0-3b-a800m", m) for m in (384, 512, 768, 1024, 1536, 2048, 4096)]
    + [("olmoe-1b-7b/tp4", m) for m in (512, 1024, 2048)]
    + [("qwen3-30b-a3b/tp2", m) for m in (512, 1024, 2048)]
    + [("mixtral-8x7b/tp8", m) for m in (512, 1024, 2048)]
    + [("qwen3-30b-a3b", m) for m in (1024, 2048, 4096)]
    + [("olmoe-1b-7b", m) for m in (1024, 2048, 4096)]
)


def tile_costs(name: str, m: int, tail_cost: float, sms: int) -> tuple[list[float], bool]:
    """GEMM1's tiles in the kernels' order (expert by expert, whole tiles then the tail,
    each row tile over its column tiles), as costs; and whether they are narrow."""
    preset = SHARDS.get(name) or PRESETS[name]
    _, topk = make_tokens(preset, m, torch.float32, torch.device("cpu"))
    counts = torch.bincount(topk.ids.reshape(-1).long(), minlength=preset.num_experts)
    narrow = gluon_gemm1_narrow_columns(m, preset.num_experts, preset.top_k, preset.inter, sms)
    column_tiles = preset.inter // (64 if narrow else 128)
    costs = []
    for rows in counts.tolist():
        blocks = math.ceil(rows / 64)
        row_tiles = [1.0] * (blocks // 2) + ([tail_cost] if blocks % 2 else [])
        costs += [c for c in row_tiles for _ in range(column_tiles)]
    return costs, narrow


def busiest(costs: list[float], sms: int, order: str) -> float:
    """The busiest SM's load under `order` ("round-robin", "snake" or "longest-first")."""
    if order == "longest-first":
        loads = [0.0] * sms
        for c in sorted(costs, reverse=True):
            heapq.heappush(loads, heapq.heappop(loads) + c)
        return max(loads)
    loads = [0.0] * sms
    for i, c in enumerate(costs):
        rnd, slot = divmod(i, sms)
        loads[slot if order == "round-robin" or rnd % 2 == 0 else sms - 1 - slot] += c
    return max(loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tail-cost", type=float, nargs="+", default=[0.55, 0.85])
    parser.add_argument("--sms", type=int, default=HOPPER_SMS)
    args = parser.parse_args()
    orders = ("round-robin", "snake", "longest-first")
    print(f"| preset | M | columns | tiles | tail cost | average | "
          f"{' | '.join(orders)} |\n|---|---|---|---|---|---|---|---|---|")
    for name, m in CELLS:
        for tail_cost in args.tail_cost:
            costs, narrow = tile_costs(name, m, tail_cost, args.sms)
            loads = " | ".join(f"{busiest(costs, args.sms, o):.2f}" for o in orders)
            print(f"| {name} | {m} | {'64' if narrow else '128'} | {len(costs)} | {tail_cost} | "
                  f"{sum(costs) / args.sms:.2f} | {loads} |")


if __name__ == "__main__":
    main()
