"""Narrow layers at mid M: the 16-bit Gluon GEMMs with every row tile 64 rows high.

Granite (40 experts, I = 512) at M = 512 makes 160 GEMM1 tiles of 128 rows × 128
columns for 132 SMs, one tile per SM at a time: two rounds for 1.2 rounds of work, and
GEMM1 ran at 35% of the bf16 peak (`h200-20261203-kernel-profile-bf16-s23a.json`). The
Gluon GEMMs already run a run's odd last 64 rows as a "tail" tile on both math
warpgroups, 64 columns each; a work list that marks *every* 64-row plan block a tail
halves the work per tile and doubles the tiles (finer rounds), at the cost of reading
each weight tile for 64 rows instead of 128. This times both GEMMs with the plan's tail
work list (128-row tiles, tails for odd blocks) and with the half-tile list (built here
from the plan; the library version that built it in the plan's place kernel is branch
s23-half-tiles, 51b16f0), graph replay, L2 read-flushed, two rounds, and checks the
outputs' valid rows bitwise equal. Measured slower (bench/NOTES.md, session 23).

    PYTHONPATH=src python3 bench/scripts/half_tile_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton

from moekit._gluon_gemm1_16bit import gluon_gemm1_16bit, use_gluon_gemm1_16bit
from moekit._gluon_gemm2_16bit import gluon_gemm2_16bit, use_gluon_gemm2_16bit
from moekit._tma import persistent_programs
from moekit.activation import Activation
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS, Preset
from moekit.bench.timing import graph_replay_us
from moekit.dispatch import dispatch_plan

SHARDS = {p.name: p for p in (Preset("mixtral-8x7b/tp8", 8, 2, 4096, 1792),
                              Preset("olmoe-1b-7b/tp4", 64, 8, 2048, 256),
                              Preset("qwen3-30b-a3b/tp2", 128, 8, 2048, 384))}
CELLS = (
    [("granite-3.0-3b-a800m", m) for m in (128, 256, 384, 512, 768, 1024, 1536, 2048, 4096)]
    + [("olmoe-1b-7b/tp4", m) for m in (256, 512, 1024, 2048, 4096)]
    + [("qwen3-30b-a3b/tp2", m) for m in (256, 512, 1024, 2048)]
    + [("mixtral-8x7b/tp8", m) for m in (512, 1024, 2048, 4096)]
    + [("qwen3-30b-a3b", m) for m in (512, 1024, 2048)]
    + [("olmoe-1b-7b", m) for m in (512, 1024)]
)


def with_half_tiles(plan):
    """The plan with its work list replaced by the half-tile list: every used 64-row
    block a tail entry (block · 2 + 1), −1 after, the count last."""
    blocks = plan.capacity // plan.block_m
    used = plan.expert_offsets[-1:] // plan.block_m
    index = torch.arange(blocks, device=used.device, dtype=torch.int32)
    entries = torch.where(index < used, index * 2 + 1, -1).to(torch.int32)
    return plan._replace(tiles=torch.cat([entries, used.to(torch.int32)]))


def valid_rows(plan):
    return plan.sorted_pairs < plan.num_pairs


def prefill_plan(topk, num_experts: int, device: torch.device):
    """What the Gluon GEMMs alone take for one routing: (router weights [M·k] fp32, the
    plan at 128-row tiles with 64-row tails, the persistent grid, the plan's valid slots)."""
    plan = dispatch_plan(topk.ids.to(torch.int32), num_experts, 64, tile_m=128,
                         backend="triton")
    return (topk.weights.float().reshape(-1), plan, persistent_programs(device),
            valid_rows(plan))


def run_cell(name: str, m: int, log) -> dict:
    preset = SHARDS.get(name) or PRESETS[name]
    dev = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, dev)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, dev)
    act = Activation.parse(preset.activation)
    weights, plan, programs, keep = prefill_plan(topk, preset.num_experts, dev)
    halved = with_half_tiles(plan)
    if not (use_gluon_gemm1_16bit(hidden, w.w13, 128, act.kind)
            and use_gluon_gemm2_16bit(w.w2, 128, plan.num_pairs)):
        log(f"{name} M={m}: not a Gluon shape, skipped")
        return {}
    row = {"preset": name, "M": m, "tiles": int(plan.tiles[-1]),
           "halves": int(halved.tiles[-1])}

    def g1(halves):
        return gluon_gemm1_16bit(hidden, w.w13, w.b13, weights, halved if halves else plan,
                                 act.kind, act.alpha, act.limit, False, programs)

    inter = g1(False)
    inter_h = g1(True)
    row["gemm1_equal"] = bool(torch.equal(inter[keep], inter_h[keep]))

    def g2(halves):
        return gluon_gemm2_16bit(inter, w.w2, w.b2, weights, halved if halves else plan,
                                 programs)

    out = g2(False)
    out_h = g2(True)
    row["gemm2_equal"] = bool(torch.equal(out[keep], out_h[keep]))
    for _ in range(2):
        for label, h in (("tiles", False), ("halves", True)):
            row.setdefault(f"gemm1_{label}_us", []).append(graph_replay_us(lambda h=h: g1(h)))
            row.setdefault(f"gemm2_{label}_us", []).append(graph_replay_us(lambda h=h: g2(h)))
    best = {k: min(v) for k, v in row.items() if k.endswith("_us")}
    log(f"{name} M={m}: tiles {row['tiles']} / halves {row['halves']}; GEMM1 "
        f"{best['gemm1_tiles_us']:.1f} → {best['gemm1_halves_us']:.1f} µs "
        f"({best['gemm1_tiles_us'] / best['gemm1_halves_us']:.3f}×), GEMM2 "
        f"{best['gemm2_tiles_us']:.1f} → {best['gemm2_halves_us']:.1f} µs "
        f"({best['gemm2_tiles_us'] / best['gemm2_halves_us']:.3f}×); equal "
        f"{row['gemm1_equal']} {row['gemm2_equal']}")
    return row


def run_cells(stem: str, default_cells, run_cell) -> int:
    """The command line of a cell-by-cell GEMM experiment: `--cells PRESET:M ...` (else
    `default_cells`) through `run_cell(name, m, log)`, its lines logged to `<stem>.log`
    and its rows rewritten to `<stem>.json` under `--out` after each cell."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--cells", nargs="*", metavar="PRESET:M")
    args = parser.parse_args()
    cells = ([(c.rsplit(":", 1)[0], int(c.rsplit(":", 1)[1])) for c in args.cells]
             if args.cells else default_cells)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with open(os.path.join(args.out, f"{stem}.log"), "w") as logf:
        def log(line):
            print(line, flush=True)
            logf.write(line + "\n")
            logf.flush()
        for name, m in cells:
            row = run_cell(name, m, log)
            if row:
                rows.append(row)
            write_rows(args.out, stem, rows)
    return 0


def write_rows(out_dir: str, stem: str, rows: list, **extra) -> None:
    """`<stem>.json` under `out_dir`: the rows with the run's device, versions, date, code
    (MOEKIT_GIT_COMMIT) and command line, and any `extra` keys."""
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                   "triton": triton.__version__, "date": datetime.date.today().isoformat(),
                   "git": os.environ.get("MOEKIT_GIT_COMMIT", "?"),
                   "command": " ".join(sys.argv), **extra, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(run_cells("half-tile-experiment", CELLS, run_cell))
