"""Experiment: the direct (plan-free, combine-fused) experts path against the plan path.

For each preset and small token count: the plan path at the heuristic's row tile for
it (`pick_block_m`), the direct path at the heuristic's direct tiles (`direct_tiles`),
and the direct path's layer with GEMM1 at the heuristic's tile and GEMM2 over a few
tiles × how many of a token's k slots one GEMM2 program sums (k: one program per token;
fewer: the parts' float32 sums added by the token's last program, `_sum_parts`), all in
CUDA-graph replay with L2 flushed; the layers' relative error against the float32
reference, whether the best split layer is bitwise the same on a second run, and the
memory floor (hit experts' bytes over the read bandwidth measured here). Each cell is
printed and appended to direct-path-experiment.jsonl under --out as soon as it is measured.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/direct_path_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

import moekit
import moekit._replay
from moekit import reference
from moekit.bench.ceilings import _bandwidths
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.roofline import moe_cost
from moekit.bench.timing import graph_replay_us
from moekit.tuning import GemmConfig
from moekit.tuning.heuristic import direct_tiles, pick_block_m, tiles_for_block_m

moekit._replay.enabled = False  # this script patches what the ops read: no replays

PRESET_NAMES = ["qwen3-30b-a3b", "granite-3.0-3b-a800m", "olmoe-1b-7b", "deepseek-v2-lite",
                "gpt-oss-120b", "mixtral-8x7b", "deepseek-v3"]
# GEMM2's (block_n, block_k, num_warps, num_stages)
TILES = [(16, 256, 4, 5), (32, 128, 4, 5), (32, 256, 4, 4), (64, 128, 4, 4), (16, 128, 4, 8),
         (64, 256, 4, 3)]
SLOTS_PER_PROGRAM = [0, 2, 1]  # 0: all k


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
    heuristic = direct_tiles(m, preset.top_k, preset.hidden)
    heuristic_us = graph_replay_us(layer(heuristic), rep_ms)
    heuristic_out = out.clone()

    trials = {}
    for n, k, warps, stages in TILES:
        for per in SLOTS_PER_PROGRAM:
            gemm2 = GemmConfig(n, k, min(per or preset.top_k, preset.top_k), warps, stages)
            config = dataclasses.replace(heuristic, gemm2=gemm2)
            if config in trials:
                continue
            trials[config] = graph_replay_us(layer(config), rep_ms)
    best = min(trials, key=trials.get)
    layer(best)()
    best_out = out.clone()
    layer(best)()
    deterministic = bool(torch.equal(out, best_out))

    f32 = lambda t: None if t is None else t.float()
    ref = reference.fused_experts(hidden.float(), w.w13.float(), w.w2.float(), topk.ids,
                                  topk.weights, activation=act, b13=f32(w.b13), b2=f32(w.b2))
    err = lambda o: ((o.float() - ref).norm() / ref.norm()).item()
    hit = int(torch.unique(topk.ids).numel())
    cost = moe_cost(m, preset.top_k, preset.hidden, preset.inter, preset.gemm1_rows, hit, 2, 2,
                    bias=preset.bias)
    floor = cost.memory_us(read_GBps)
    best_whole = min((c for c in trials if c.gemm2.group_m >= preset.top_k), key=trials.get)
    gemm2 = lambda c: list(dataclasses.astuple(c.gemm2))
    return {"device": torch.cuda.get_device_name(), "preset": preset.name, "M": m,
            "git_commit": os.environ.get("MOEKIT_GIT_COMMIT"), "experts_hit": hit,
            "floor_us": round(floor, 2), "plan_us": round(plan_us, 2),
            "heuristic_us": round(heuristic_us, 2), "best_us": round(trials[best], 2),
            "best_whole_token_us": round(trials[best_whole], 2),
            "best_gemm2": gemm2(best), "best_whole_token_gemm2": gemm2(best_whole),
            "split_gain": round(trials[best_whole] / trials[best], 3),
            "plan_roofline": round(floor / plan_us, 3),
            "heuristic_roofline": round(floor / heuristic_us, 3),
            "best_roofline": round(floor / trials[best], 3),
            "best_deterministic": deterministic,
            "gemm2_trials_us": {str(gemm2(c)): round(v, 2) for c, v in trials.items()},
            "plan_rel_err": err(plan_out), "heuristic_rel_err": err(heuristic_out),
            "best_rel_err": err(best_out)}


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
            print(json.dumps({k: v for k, v in row.items() if k != "gemm2_trials_us"}),
                  flush=True)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
