"""Experiment: the direct (plan-free, combine-fused) experts path against the plan path.

For each preset and small token count: the plan path at the heuristic's row tile for
it (`pick_block_m`), the direct path at the heuristic's direct tiles (`direct_tiles`),
each direct GEMM alone over a few tiles (CUDA-graph replay, L2 flushed), and the layer
with the best tile of each GEMM; the layers' relative error against the float32
reference, and the memory floor (hit experts' bytes over the read bandwidth measured
here). Each cell is printed and appended to direct-path-experiment.jsonl under --out as
soon as it is measured.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/direct_path_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

import moekit
from moekit import reference
from moekit.bench.ceilings import _bandwidths
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.roofline import moe_cost
from moekit.bench.timing import graph_replay_us
from moekit.experts_direct import launch_direct_gemm1, launch_direct_gemm2
from moekit.tuning import ExpertsConfig, GemmConfig
from moekit.tuning.heuristic import direct_tiles, pick_block_m, tiles_for_block_m

PRESET_NAMES = ["qwen3-30b-a3b", "granite-3.0-3b-a800m", "olmoe-1b-7b", "deepseek-v2-lite",
                "gpt-oss-120b", "mixtral-8x7b", "deepseek-v3"]
# (block_n, block_k, num_warps, num_stages)
TILES = [(16, 512, 4, 3), (16, 256, 4, 5), (32, 256, 4, 4), (32, 128, 4, 5), (64, 128, 4, 4),
         (16, 128, 4, 8), (16, 256, 4, 7)]


def _gemm(tile) -> GemmConfig:
    n, k, w, s = tile
    return GemmConfig(n, k, 1, w, s)


def time_cell(preset, w, m, rep_ms, read_GBps) -> dict:
    hidden, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
    act = moekit.Activation.parse(preset.activation)
    out = torch.empty_like(hidden)

    def layer(config):
        return lambda: moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                            activation=act, b13=w.b13, b2=w.b2, config=config,
                                            out=out)

    plan_cfg = tiles_for_block_m(pick_block_m(m, preset.num_experts, preset.top_k))
    plan_us = graph_replay_us(layer(plan_cfg), rep_ms)
    plan_out = out.clone()
    heuristic_us = graph_replay_us(layer(direct_tiles(m, preset.hidden)), rep_ms)
    heuristic_out = out.clone()

    g1 = lambda t: launch_direct_gemm1(hidden, w.w13, w.b13, topk.ids, topk.weights, act.kind,
                                       act.alpha, act.limit, False, dataclasses.astuple(_gemm(t)))
    inter = g1(TILES[0])
    gemm1_us = {str(t): graph_replay_us(lambda t=t: g1(t), rep_ms) for t in TILES}
    gemm2_us = {str(t): graph_replay_us(
        lambda t=t: launch_direct_gemm2(inter, w.w2, w.b2, topk.ids, topk.weights, True,
                                        dataclasses.astuple(_gemm(t)), out), rep_ms)
        for t in TILES}
    best1 = min(TILES, key=lambda t: gemm1_us[str(t)])
    best2 = min(TILES, key=lambda t: gemm2_us[str(t)])
    direct_cfg = ExpertsConfig(1, _gemm(best1), _gemm(best2))
    direct_us = graph_replay_us(layer(direct_cfg), rep_ms)
    direct_out = out.clone()

    f32 = lambda t: None if t is None else t.float()
    ref = reference.fused_experts(hidden.float(), w.w13.float(), w.w2.float(), topk.ids,
                                  topk.weights, activation=act, b13=f32(w.b13), b2=f32(w.b2))
    err = lambda o: ((o.float() - ref).norm() / ref.norm()).item()
    hit = int(torch.unique(topk.ids).numel())
    cost = moe_cost(m, preset.top_k, preset.hidden, preset.inter, preset.gemm1_rows, hit, 2, 2,
                    bias=preset.bias)
    floor = cost.memory_us(read_GBps)
    return {"device": torch.cuda.get_device_name(), "preset": preset.name, "M": m,
            "git_commit": os.environ.get("MOEKIT_GIT_COMMIT"), "experts_hit": hit,
            "floor_us": round(floor, 2), "plan_us": round(plan_us, 2),
            "direct_us": round(direct_us, 2), "speedup": round(plan_us / direct_us, 3),
            "direct_heuristic_us": round(heuristic_us, 2),
            "heuristic_speedup": round(plan_us / heuristic_us, 3),
            "plan_roofline": round(floor / plan_us, 3),
            "direct_roofline": round(floor / direct_us, 3),
            "heuristic_roofline": round(floor / heuristic_us, 3),
            "best_gemm1": best1, "best_gemm2": best2,
            "gemm1_us": {k: round(v, 2) for k, v in gemm1_us.items()},
            "gemm2_us": {k: round(v, 2) for k, v in gemm2_us.items()},
            "plan_rel_err": err(plan_out), "direct_rel_err": err(direct_out),
            "heuristic_rel_err": err(heuristic_out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rep-ms", type=float, default=20)
    parser.add_argument("--presets", nargs="+", default=PRESET_NAMES)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 8])
    args = parser.parse_args()
    copy_GBps, read_GBps = _bandwidths(1 << 28, "cuda", None)
    print(f"read {read_GBps:.0f} GB/s, copy {copy_GBps:.0f} GB/s", flush=True)
    path = os.path.join(args.out, "direct-path-experiment.jsonl")
    for name in args.presets:
        preset = PRESETS[name]
        weights = make_weights(preset, torch.bfloat16, torch.device("cuda"))
        for m in args.tokens:
            row = time_cell(preset, weights, m, args.rep_ms, max(read_GBps, copy_GBps))
            row["read_GBps"] = round(max(read_GBps, copy_GBps))
            print(json.dumps(row), flush=True)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
