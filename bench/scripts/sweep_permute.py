"""Time permute/unpermute launch configs at prefill, to pick `moekit.permute.row_config`.

For every preset and M (default 4096 and 16384) it times each candidate
{BLOCK_H, ROWS, num_warps} of both kernels — the heuristic's own pick included — with
the routing table's method (`moekit.bench.routing_table.replay_time_us`: GPU time per
call through CUDA-graph replay over rotating input sets) and its floor bytes, so the
figures compare with `moekit bench routing`. Prints one line per timing and a summary
(per config: geometric mean of time ÷ the cell's best, worst ratio, cells won; per cell:
the best config and the heuristic's % of copy bandwidth), and writes it all to
<out>/sweep_permute.json.

Usage: PYTHONPATH=src python3 bench/scripts/sweep_permute.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch
import triton

from moekit.bench.args import preset_names, token_counts
from moekit.bench.ceilings import _bandwidths
from moekit.bench.presets import PRESETS, get_preset
from moekit.bench.routing_table import op_bytes, replay_time_us, sets_needed
from moekit.dispatch import dispatch_plan
from moekit.permute import permute, permute_row_config, row_config, run_permute, run_unpermute
from moekit.routing import route
from moekit.tuning.heuristic import pick_block_m

# (BLOCK_H, ROWS, num_warps); BLOCK_H "row" = the row's power of two, at most 8 KB.
CANDIDATES = [
    ("row", 1, 4), ("row", 1, 8), ("row", 2, 8), ("row", 4, 8),
    (1024, 1, 4), (1024, 2, 4), (1024, 4, 8), (512, 4, 4),
]
MAX_TILE_ELEMENTS = 8192  # larger [ROWS, BLOCK_H] tiles spill in unpermute's fp32 sum


def candidates(op: str, m: int, hidden: int, elem: int) -> list[dict]:
    """The op's heuristic config first, then every distinct candidate that fits."""
    row = min(triton.next_power_of_2(hidden), 8192 // elem)
    heuristic = permute_row_config if op == "permute" else row_config
    out = [dict(heuristic(m, hidden, elem), heuristic=True)]
    for block_h, rows, warps in CANDIDATES:
        block_h = row if block_h == "row" else min(block_h, row)
        cfg = {"BLOCK_H": block_h, "ROWS": rows, "num_warps": warps, "heuristic": False}
        per_thread = rows * block_h // (32 * warps)
        if rows * block_h > MAX_TILE_ELEMENTS or per_thread < 16 // elem:
            continue
        if all({k: c[k] for k in ("BLOCK_H", "ROWS", "num_warps")}
               != {k: cfg[k] for k in ("BLOCK_H", "ROWS", "num_warps")} for c in out):
            out.append(cfg)
    return out


def sweep_cell(preset, m: int, ops: list[str], args, copy_GBps: float, l2: int) -> list[dict]:
    E, k, H = preset.num_experts, preset.top_k, preset.hidden
    block_m = pick_block_m(m, E, k)
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(args.seed + m)
    plan0 = dispatch_plan(route(torch.randn((m, E), generator=gen, device="cuda"), k).ids,
                          E, block_m)
    size = {"m": m, "E": E, "k": k, "H": H, "elem": 2, "capacity": plan0.capacity,
            "used": int(plan0.expert_offsets[-1]), "block_m": block_m,
            "kept": int((plan0.pair_slots >= 0).sum())}
    n_sets = max(sets_needed(op_bytes(op, **size), l2, args.sets) for op in ops)
    sets = []
    for _ in range(n_sets):
        topk = route(torch.randn((m, E), generator=gen, device="cuda"), k)
        plan = dispatch_plan(topk.ids, E, block_m)
        hidden = torch.randn((m, H), generator=gen, device="cuda").to(dtype)
        grouped = permute(hidden, plan, top_k=k)[0]
        sets.append((topk, plan, hidden, grouped, torch.empty_like(grouped),
                     torch.empty_like(hidden)))
    rows = []
    for op in ops:
        nbytes = op_bytes(op, **size)
        for cfg in candidates(op, m, H, 2):
            launch = {key: cfg[key] for key in ("BLOCK_H", "ROWS", "num_warps")}
            if op == "permute":
                calls = [partial(run_permute, s[2], s[1].sorted_pairs,
                                 s[1].expert_offsets, s[1].pair_slots, None, k, block_m,
                                 s[4], None, launch) for s in sets]
            else:
                calls = [partial(run_unpermute, s[3], s[1].pair_slots, s[0].weights, s[5],
                                 launch) for s in sets]
            t = replay_time_us(calls, graph_us=args.graph_us, rep_ms=args.rep_ms)["time_us"]
            gbps = nbytes / (t * 1e-6) / 1e9
            row = {"op": op, "preset": preset.name, "M": m, "E": E, "topk": k, "H": H,
                   "block_m": block_m, **cfg, "time_us": round(t, 2), "bytes": nbytes,
                   "GBps": round(gbps, 1), "copy_pct": round(100 * gbps / copy_GBps, 1),
                   "input_sets": n_sets}
            rows.append(row)
            print(f"{op:9} {preset.name:22} M={m:<6} BLOCK_H={cfg['BLOCK_H']:<5} "
                  f"ROWS={cfg['ROWS']} warps={cfg['num_warps']}"
                  f"{' (heuristic)' if cfg['heuristic'] else '':12} {t:9.2f} µs "
                  f"{row['copy_pct']:6.1f}% of copy", flush=True)
    del sets
    torch.cuda.empty_cache()
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per op: each config's geometric-mean slowdown against the best of its cell."""
    summary = {}
    for op in dict.fromkeys(r["op"] for r in rows):
        cells: dict = {}
        for r in (r for r in rows if r["op"] == op):
            cells.setdefault((r["preset"], r["M"]), []).append(r)
        best = {c: min(rs, key=lambda r: r["time_us"]) for c, rs in cells.items()}
        per_config: dict = {}
        for c, rs in cells.items():
            for r in rs:
                ratio = r["time_us"] / best[c]["time_us"]
                key = f"BLOCK_H={r['BLOCK_H']} ROWS={r['ROWS']} warps={r['num_warps']}"
                per_config.setdefault(key, []).append(ratio)
                if r["heuristic"]:  # also on its own line: its parameters vary by cell
                    per_config.setdefault("heuristic", []).append(ratio)
        summary[op] = {
            "configs": {key: {"geomean_vs_best": round(math.exp(sum(map(math.log, v)) / len(v)), 3),
                              "worst_vs_best": round(max(v), 3), "cells": len(v),
                              "wins": sum(1 for x in v if x == 1.0)}
                        for key, v in sorted(per_config.items())},
            "best_per_cell": [
                {"preset": p, "M": m, "BLOCK_H": b["BLOCK_H"], "ROWS": b["ROWS"],
                 "num_warps": b["num_warps"], "time_us": b["time_us"], "copy_pct": b["copy_pct"],
                 "heuristic_copy_pct": next(r["copy_pct"] for r in cells[(p, m)] if r["heuristic"])}
                for (p, m), b in best.items()],
        }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", type=preset_names, action="extend")
    parser.add_argument("--tokens", nargs="+", type=token_counts, action="extend")
    parser.add_argument("--ops", nargs="+", choices=("permute", "unpermute"),
                        default=["permute", "unpermute"])
    parser.add_argument("--sets", type=int, default=4, help="most input sets (default: 4)")
    parser.add_argument("--graph-us", type=float, default=300)
    parser.add_argument("--rep-ms", type=float, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, metavar="DIR", help="write sweep_permute.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("sweep_permute: no CUDA device, nothing to time", file=sys.stderr)
        return 0
    names = [n for group in (args.presets or [list(PRESETS)]) for n in group]
    tokens = sorted({m for group in (args.tokens or [[4096, 16384]]) for m in group})
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = getattr(props, "L2_cache_size", 0) or 50 * 2**20
    copy_GBps, read_GBps = _bandwidths(2**30, "cuda", None)  # 4 GiB of float32
    print(f"{props.name}: copy {copy_GBps:,.0f} GB/s, read {read_GBps:,.0f} GB/s", flush=True)
    started = time.perf_counter()
    rows = []
    for name in dict.fromkeys(names):
        for m in tokens:
            rows += sweep_cell(get_preset(name), m, args.ops, args, copy_GBps, l2)
    summary = summarize(rows)
    for op, s in summary.items():
        print(f"\n{op}: config — geomean time ÷ best of cell, worst, cells won")
        for key, v in sorted(s["configs"].items(), key=lambda kv: kv[1]["geomean_vs_best"]):
            print(f"  {key:34} {v['geomean_vs_best']:.3f}  {v['worst_vs_best']:.3f}  "
                  f"{v['wins']}/{v['cells']}")
        for b in s["best_per_cell"]:
            print(f"  best {b['preset']:22} M={b['M']:<6} BLOCK_H={b['BLOCK_H']:<5} "
                  f"ROWS={b['ROWS']} warps={b['num_warps']}: {b['copy_pct']}% of copy "
                  f"(heuristic {b['heuristic_copy_pct']}%)")
    doc = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
           "copy_GBps": round(copy_GBps, 1), "read_GBps": round(read_GBps, 1),
           "timing": "moekit.bench.routing_table.replay_time_us (CUDA-graph replay, rotating "
                     "input sets, GPU time per call)",
           "elapsed_s": round(time.perf_counter() - started, 1), "summary": summary,
           "rows": rows}
    if args.out:
        path = Path(args.out) / "sweep_permute.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
