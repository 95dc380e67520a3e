"""The Triton GEMMs' tile order at the prefill cells that stream weights near the ridge.

Session 49's Nsight Compute run (bench/NOTES.md) found deepseek-v3's Triton GEMM1 at
M = 8192 reading 23.7 GB from DRAM for ~16 GB of weights and rows, at 82% of the memory
throughput: weights read more than once. `_tile_of`'s groups of GROUP_M row tiles cut
through experts, reading a cut expert's weights once per group, a wave apart; groups that
never split an expert (`_expert_tile_of`, `moekit._tile_order`) read them once. This
times each GEMM alone (CUDA-graph replay, L2 emptied before each) under orders:
  gN  `_tile_of` with GROUP_M = N (g8: the shipped heuristic's)
  eN  `_expert_tile_of` with groups of at most N of an expert's row tiles
then the whole layer, g8 against e8 (whichever the shipped rule, `moekit._tile_order`,
would pick); rounds alternate the order of variants.
Every variant's outputs are checked bitwise against g8's.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/tile_order_experiment.py --out $OUT
Writes <stem>.{json,md} under --out (default stem tile-order-experiment), after every cell.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import moekit._replay
import moekit._tile_order
from moekit.bench.experiment_files import experiment_meta, write_experiment
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import get_preset
from moekit.bench.timing import graph_replay_us
from moekit.dispatch import dispatch_plan
from moekit.experts import _select_config, fused_experts, launch_gemm1, launch_gemm2, use_tma

moekit._replay.enabled = False  # the call's own launches, read with the order of the moment

CELLS = ["deepseek-v3:4096", "deepseek-v3:8192", "deepseek-v3:16384", "gpt-oss-120b:4096",
         "gpt-oss-120b:8192", "gpt-oss-120b:16384"]
ORDERS = ["g8", "g1", "g2", "g4", "g16", "e4", "e8", "e16"]


def with_order(order: str, tiles: list[int], run):
    """run(tiles) under `order`: GROUP_M from its number, expert groups if it starts with e."""
    forced = moekit._tile_order.FORCED
    moekit._tile_order.FORCED = order.startswith("e")
    try:
        return run([tiles[0], tiles[1], int(order[1:]), tiles[3], tiles[4]])
    finally:
        moekit._tile_order.FORCED = forced


def run_cell(name: str, num_tokens: int, rounds: int, log) -> list[dict]:
    preset = get_preset(name)
    dev = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, dev)
    hidden, topk = make_tokens(preset, num_tokens, torch.bfloat16, dev)
    ids, weights = topk.ids, topk.weights
    E = w.w13.shape[0]
    cfg = _select_config(hidden, E, ids.shape[1], w.w2.shape[2])
    ints = cfg.as_ints()
    block_m, tail_m, g1, g2 = ints[0], ints[11], ints[1:6], ints[6:11]
    plan = dispatch_plan(ids, E, tail_m or block_m, tile_m=block_m if tail_m else None,
                         backend="triton")
    tma = use_tma(hidden, w.w13, w.w2, block_m)
    if not tma:
        log(f"{name} M={num_tokens}: not on the TMA path; skipped")
        return []
    act = preset.activation

    def gemm1(tiles):
        return launch_gemm1(hidden, w.w13, w.b13, weights, plan, act, 1.702, 7.0, False,
                            tiles, tma)

    inter = gemm1(g1)

    def gemm2(tiles):
        return launch_gemm2(inter, w.w2, w.b2, weights, plan, True, tiles, tma)

    # The outputs of every order against the shipped one's (padding rows of inter aside).
    valid = plan.sorted_pairs < plan.num_pairs
    ref1, ref2 = inter[valid].clone(), gemm2(g2).clone()
    same = {}
    for order in ORDERS:
        a = with_order(order, g1, gemm1)
        b = with_order(order, g2, gemm2)
        same[order] = bool(torch.equal(a[valid], ref1) and torch.equal(b, ref2))
    log(f"{name} M={num_tokens} block_m={block_m}/{tail_m} GEMM1 {g1} GEMM2 {g2}: "
        f"outputs bitwise g8's: {same}")
    out = torch.empty_like(hidden)

    def layer(_tiles):
        return fused_experts(hidden, w.w13, w.w2, ids, weights, activation=act, b13=w.b13,
                             b2=w.b2, out=out)

    times: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        for order in (ORDERS if r % 2 == 0 else ORDERS[::-1]):
            for stage, run, tiles in (("gemm1", gemm1, g1), ("gemm2", gemm2, g2)):
                us = graph_replay_us(lambda o=order, t=tiles, f=run: with_order(o, t, f))
                times.setdefault((stage, order), []).append(us)
            if order in ("g8", "e8"):
                us = graph_replay_us(lambda o=order: with_order(o, g1, layer))
                times.setdefault(("layer", order), []).append(us)
        log(f"{name} M={num_tokens} round {r + 1}: " + ", ".join(
            f"{s} {o} {v[-1]:.0f}" for (s, o), v in times.items()))
    rows = []
    for (stage, order), samples in times.items():
        base = statistics.median(times[(stage, "g8")])
        us = statistics.median(samples)
        rows.append({"preset": name, "M": num_tokens, "stage": stage, "order": order,
                     "us": round(us, 1), "samples": [round(x, 1) for x in samples],
                     "speedup_vs_g8": round(base / us, 4), "bitwise_g8": same.get(order)})
    return rows


def table(rows: list[dict]) -> list[str]:
    """One Markdown table per stage: µs (speed-up against g8) per cell and order."""
    lines = []
    cells = sorted({(r["preset"], r["M"]) for r in rows})
    for stage in ("gemm1", "gemm2", "layer"):
        orders = [o for o in ORDERS if any(r["stage"] == stage and r["order"] == o
                                           for r in rows)]
        if not orders:
            continue
        lines += [f"**{stage}**", "", "| cell | " + " | ".join(orders) + " |",
                  "|---|" + "---|" * len(orders)]
        for preset, m in cells:
            got = {r["order"]: r for r in rows
                   if r["preset"] == preset and r["M"] == m and r["stage"] == stage}
            cols = [f"{got[o]['us']:,.0f} ({got[o]['speedup_vs_g8']:.3f}×)" if o in got
                    else "—" for o in orders]
            lines.append(f"| {preset} M={m} | " + " | ".join(cols) + " |")
        lines.append("")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="directory of the results")
    parser.add_argument("--stem", default="tile-order-experiment")
    parser.add_argument("--cells", nargs="*", default=CELLS, help="preset:M pairs")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for cell in args.cells:
        name, num_tokens = cell.rsplit(":", 1)
        try:
            rows += run_cell(name, int(num_tokens), args.rounds, lambda s: print(s, flush=True))
        except Exception as exc:  # a study: report the cell and go on
            print(f"{cell}: failed: {str(exc)[:300]}", flush=True)
        torch.cuda.empty_cache()
        write_experiment(args.out, args.stem, experiment_meta(), rows,  # after every cell
                         "Tile order of the Triton GEMMs", NOTES, table(rows))
    return 0


NOTES = ["- each GEMM alone by CUDA-graph replay, L2 emptied before each replay; median over "
         "rounds (variants in alternating order); speed-up = g8 µs ÷ this µs",
         "- gN: `_tile_of`, GROUP_M = N (g8 shipped); eN: `_expert_tile_of`, groups of at "
         "most N of one expert's row tiles; layer: the whole call, shipped order against e8"]


if __name__ == "__main__":
    sys.exit(main())
