"""Where the time of one `fused_experts` call goes: plan, GEMM1, GEMM2, combine, and the gaps.

Each stage is captured alone in a CUDA graph and timed by replay (L2 flushed between
replays), next to the whole call captured the same way; the difference between the
whole and the sum of the stages is what launching four kernels costs on the GPU (gaps
and tails). For the GEMMs the weight bytes actually read (experts hit) give an achieved
bandwidth, the figure decode cares about. `--tiles` also times GEMM1 and GEMM2 with other
column tiles, to see whether a cell is short of programs.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/stage_breakdown.py --out $OUT
Writes stage-breakdown.json under --out and prints one line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

import moekit._replay
from moekit.bench.inputs import experts_hit, make_tokens, make_weights
from moekit.bench.presets import get_preset
from moekit.bench.timing import graph_replay_us
from moekit.dispatch import dispatch_plan
from moekit.experts import fused_experts, launch_combine, launch_gemm1, launch_gemm2, use_tma
from moekit.tuning.heuristic import default_config

moekit._replay.enabled = False  # this script patches what the ops read: no replays

CELLS = ["qwen3-30b-a3b:1", "qwen3-30b-a3b:8", "qwen3-30b-a3b:64", "qwen3-30b-a3b:1024",
         "granite-3.0-3b-a800m:1", "granite-3.0-3b-a800m:8", "granite-3.0-3b-a800m:64",
         "granite-3.0-3b-a800m:512", "olmoe-1b-7b:1", "olmoe-1b-7b:8",
         "deepseek-v2-lite:1", "deepseek-v2-lite:8", "gpt-oss-120b:1", "mixtral-8x7b:1024"]


def run_cell(name: str, num_tokens: int, tiles: bool, log) -> list[dict]:
    preset = get_preset(name)
    dev = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, dev)
    hidden, topk = make_tokens(preset, num_tokens, torch.bfloat16, dev)
    ids, weights = topk.ids.to(torch.int32), topk.weights.float()
    E, n1, H = w.w13.shape
    I = w.w2.shape[2]
    cfg = default_config(num_tokens, E, ids.shape[1], H, I)
    hit = experts_hit(ids, E)
    elem = 2
    bytes1, bytes2 = hit * n1 * H * elem, hit * H * I * elem
    plan = dispatch_plan(ids, E, cfg.block_m, backend="triton")
    tma = use_tma(hidden, w.w13, w.w2, cfg.block_m)
    g1 = (cfg.gemm1.block_n, cfg.gemm1.block_k, cfg.gemm1.group_m, cfg.gemm1.num_warps,
          cfg.gemm1.num_stages)
    g2 = (cfg.gemm2.block_n, cfg.gemm2.block_k, cfg.gemm2.group_m, cfg.gemm2.num_warps,
          cfg.gemm2.num_stages)
    act = preset.activation
    inter = launch_gemm1(hidden, w.w13, w.b13, weights, plan, act, 1.702, 7.0, False, g1, tma)
    pair_out = launch_gemm2(inter, w.w2, w.b2, weights, plan, True, g2, tma)
    out = torch.empty_like(hidden)
    rows = []

    def record(stage, us, nbytes=None):
        gbps = nbytes / us / 1e3 if nbytes else None
        rows.append({"preset": name, "M": num_tokens, "block_m": cfg.block_m, "stage": stage,
                     "us": round(us, 2), "GBps": None if gbps is None else round(gbps)})
        log(f"{name} M={num_tokens} bm={cfg.block_m} {stage}: {us:.1f} µs"
            + ("" if gbps is None else f", {gbps:.0f} GB/s of weights"))

    total = graph_replay_us(lambda: fused_experts(hidden, w.w13, w.w2, ids, weights,
                                                  activation=act, b13=w.b13, b2=w.b2, out=out))
    record("total", total)
    gemm1 = lambda: launch_gemm1(hidden, w.w13, w.b13, weights, plan, act, 1.702, 7.0,  # noqa: E731
                                 False, g1, tma)
    gemm2 = lambda: launch_gemm2(inter, w.w2, w.b2, weights, plan, True, g2, tma)  # noqa: E731
    parts = {
        "plan": graph_replay_us(lambda: dispatch_plan(ids, E, cfg.block_m, backend="triton")),
        "gemm1": graph_replay_us(gemm1),
        "gemm2": graph_replay_us(gemm2),
        "combine": graph_replay_us(lambda: launch_combine(pair_out, ids, E, out)),
    }
    for stage, us in parts.items():
        record(stage, us, {"gemm1": bytes1, "gemm2": bytes2}.get(stage))
    record("gaps (total - stages)", total - sum(parts.values()))
    if tiles and cfg.block_m < 128:
        for bn in (32, 64, 128):
            for bk in (128, 256):
                for warps in (4,):
                    t1 = (bn, bk, 1, warps, 3 if bk == 256 else 4)
                    try:
                        record(f"gemm1[{bn}x{bk} w{warps}]",
                               graph_replay_us(lambda t1=t1: launch_gemm1(
                                   hidden, w.w13, w.b13, weights, plan, act, 1.702, 7.0, False,
                                   t1, False)), bytes1)
                        record(f"gemm2[{bn}x{bk} w{warps}]",
                               graph_replay_us(lambda t1=t1: launch_gemm2(
                                   inter, w.w2, w.b2, weights, plan, True, t1, False)), bytes2)
                    except Exception as exc:  # out of resources etc.: report and go on
                        log(f"{name} M={num_tokens} tiles {t1}: {str(exc)[:200]}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="directory of stage-breakdown.json")
    parser.add_argument("--cells", nargs="*", default=CELLS, help="preset:M pairs")
    parser.add_argument("--tiles", action="store_true", help="also time other GEMM tiles")
    args = parser.parse_args()
    rows = []
    for cell in args.cells:
        name, num_tokens = cell.rsplit(":", 1)
        try:
            rows += run_cell(name, int(num_tokens), args.tiles, lambda s: print(s, flush=True))
        except Exception as exc:  # a study: report the cell and go on
            print(f"{cell}: failed: {str(exc)[:300]}", flush=True)
        torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": triton.__version__, "command": " ".join(sys.argv)}
    Path(args.out, "stage-breakdown.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
