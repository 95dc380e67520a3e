"""Experiment: the fp8 direct path (quantisation inside two GEMMs) against the fp8 plan path.

For each preset, fp8 scheme and small token count: the plan path (`plan_fp8_config`: five
or six launches), the direct path at its heuristic tiles (`direct_fp8_config`; and, where
the scheme's scales group K, with GEMM1's other K depth: one group or two), then a
coordinate search over direct tiles (GEMM1's with GEMM2 at the heuristic's, then GEMM2's
tiles × how many of a token's slots one GEMM2 program sums, with GEMM1 at its best), each
a whole layer in CUDA-graph replay; the relative error of
plan and direct against the quantised reference, and the memory floor (hit experts' fp8
bytes and scales over the read bandwidth measured here). Each cell is printed and
appended to direct-fp8-experiment.jsonl under --out as soon as it is measured.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/direct_fp8_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os

import torch

import moekit
import moekit._replay
from moekit.bench.ceilings import _bandwidths
from moekit.bench.fp8 import quantize_experts, weight_bytes_per_element
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.roofline import moe_cost
from moekit.bench.timing import graph_replay_us
from moekit.experts_direct import gemm2_arrivals
from moekit.experts_direct_fp8 import (
    gemm1_group_counts,
    launch_direct_gemm1_fp8,
    launch_direct_gemm2_fp8,
)
from moekit.experts_fp8 import (
    _fit_k,
    _gemm1_input,
    _groups_to_list,
    _k_groups,
    direct_fp8_config,
    plan_fp8_config,
)
from moekit.quant import QuantScheme
from moekit.reference import fused_experts_quantized
from moekit.tuning import GemmConfig

moekit._replay.enabled = False  # this script patches what the ops read: no replays

PRESET_NAMES = ["qwen3-30b-a3b", "granite-3.0-3b-a800m", "olmoe-1b-7b", "deepseek-v2-lite",
                "gpt-oss-120b", "mixtral-8x7b", "deepseek-v3"]
SCHEMES = ["fp8_tensor", "fp8_channel", "fp8_block"]  # dynamic: the experiment's launches
# (block_n, block_k, num_warps, num_stages); K tiles are cut to the scheme's groups.
GEMM1_TILES = [(32, 256, 4, 4), (32, 128, 4, 8), (64, 128, 4, 6), (16, 256, 4, 6)]
# GEMM2 streams BLOCK_N × 128 bytes per step: deep pipelines keep enough of them in flight.
GEMM2_TILES = [(16, 128, 4, 8), (16, 128, 4, 12), (32, 128, 4, 8), (32, 128, 4, 12),
               (64, 128, 4, 6),
               # K tiles of 64: whole tiles where I is an odd multiple of 64 (gpt-oss 2880)
               (64, 64, 4, 8), (32, 64, 4, 12),
               # 16 KB a step: half the steps (and their waits) for the same bytes
               (128, 128, 4, 4), (128, 128, 4, 6), (128, 128, 8, 6)]
SLOTS_PER_PROGRAM = [0, 2, 1]  # GEMM2's group_m; 0: all k (one program per token)


def time_cell(preset, weights, scheme_name, m, rep_ms, read_GBps, search=True) -> dict:
    scheme = QuantScheme.parse(scheme_name)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
    act = moekit.Activation.parse(preset.activation)
    out = torch.empty_like(hidden)
    k1, k2, _ = _k_groups(scheme)

    def layer(config):
        return lambda: moekit.fused_experts_fp8(hidden, weights.w13, weights.w2, topk.ids,
                                                topk.weights, scheme=scheme, activation=act,
                                                b13=weights.b13, b2=weights.b2, config=config,
                                                out=out)

    def timed(config):
        return graph_replay_us(layer(config), rep_ms)

    plan_us = timed(plan_fp8_config(m, preset.num_experts, preset.top_k, scheme))
    plan_out = out.clone()
    heuristic = direct_fp8_config(m, preset.top_k, preset.hidden, preset.inter, scheme)
    heuristic_us = timed(heuristic)
    heuristic_out = out.clone()
    # Where the scheme groups K: GEMM1's other K depth (two groups as sub-steps, or one).
    other_k = None
    if k1:
        depth = min(k1) if heuristic.gemm1.block_k > min(k1) else 2 * min(k1)
        other_k = dataclasses.replace(heuristic, gemm1=dataclasses.replace(
            heuristic.gemm1, block_k=depth))
    other_k_us = timed(other_k) if other_k else None
    trials = {}
    best, best_us = heuristic, heuristic_us
    pers = sorted({min(p or preset.top_k, preset.top_k) for p in SLOTS_PER_PROGRAM})
    searches = (("gemm1", GEMM1_TILES, k1, [1]), ("gemm2", GEMM2_TILES, k2, pers))
    for gemm, tiles, groups, group_ms in searches if search else ():
        start = best
        for (n, k, w, s), group_m in itertools.product(tiles, group_ms):
            trial = dataclasses.replace(
                start, **{gemm: _fit_k(GemmConfig(n, k, group_m, w, s), groups)})
            if trial == start or str(trial) in trials:
                continue
            us = trials[str(trial)] = timed(trial)
            if us < best_us:
                best, best_us = trial, us

    # Each launch of the best configuration alone: quantise hidden, GEMM1 (GEMM2's input
    # quantised in its epilogue; with a memset of its group counters when a group spans
    # its column tiles), GEMM2 (with a memset of its arrival counters when it splits a
    # token's slots); and the two GEMMs chained on quantised hidden.
    groups = _groups_to_list(scheme)
    tiles = best.as_ints()
    counts = gemm1_group_counts(topk.ids, preset.inter, groups[4], False, tiles[1])
    quant1 = lambda: _gemm1_input(hidden, groups[2], groups[3], None, clear=counts)
    x = quant1()
    arrivals = gemm2_arrivals(topk.ids, preset.hidden, tiles[6:11])

    def gemm1():
        if counts is not None:
            counts.zero_()
        return launch_direct_gemm1_fp8(
            x.x, x.scale, x.stride_sm, weights.w13.q, weights.w13.scale, weights.b13, topk.ids,
            preset.inter, act.kind, act.alpha, act.limit, groups, None, tiles[1:6], counts,
            arrivals)
    inter_q, inter_scale = gemm1()

    def gemm2_alone():  # arrivals zeroed by the GEMM1 before it
        launch_direct_gemm2_fp8(inter_q, inter_scale, False, weights.w2.q, weights.w2.scale,
                                weights.b2, topk.ids, topk.weights, groups, tiles[6:11], out,
                                arrivals)

    def gemm2():
        if arrivals is not None:
            arrivals.zero_()
        gemm2_alone()
    stage_us = {name: round(graph_replay_us(fn, rep_ms), 2) for name, fn in
                (("quantize1", quant1), ("gemm1", gemm1), ("gemm2", gemm2),
                 ("gemm1+gemm2", lambda: (gemm1(), gemm2_alone())))}

    expected = fused_experts_quantized(hidden, weights.w13, weights.w2, topk.ids, topk.weights,
                                       scheme=scheme, activation=act, b13=weights.b13,
                                       b2=weights.b2).float()
    err = lambda o: ((o.float() - expected).norm() / expected.norm()).item()
    hit = int(torch.unique(topk.ids).numel())
    cost = moe_cost(m, preset.top_k, preset.hidden, preset.inter, preset.gemm1_rows, hit,
                    weight_bytes_per_element(preset, scheme_name), 2, bias=preset.bias,
                    bias_bytes=2)
    floor = cost.memory_us(read_GBps)
    return {"device": torch.cuda.get_device_name(), "preset": preset.name, "scheme": scheme_name,
            "M": m, "git_commit": os.environ.get("MOEKIT_GIT_COMMIT"), "experts_hit": hit,
            "floor_us": round(floor, 2), "plan_us": round(plan_us, 2),
            "direct_heuristic_us": round(heuristic_us, 2), "direct_best_us": round(best_us, 2),
            "heuristic_speedup": round(plan_us / heuristic_us, 3),
            "plan_roofline": round(floor / plan_us, 3),
            "heuristic_roofline": round(floor / heuristic_us, 3),
            "best_roofline": round(floor / best_us, 3),
            "heuristic_over_best": round(heuristic_us / best_us, 3),
            "gemm1_other_k": other_k and other_k.gemm1.block_k,
            "gemm1_other_k_us": other_k_us and round(other_k_us, 2),
            "best_stage_us": stage_us,
            "heuristic": str(heuristic), "best": str(best),
            "trials_us": {k: round(v, 2) for k, v in trials.items()},
            "plan_rel_err": err(plan_out), "direct_rel_err": err(heuristic_out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rep-ms", type=float, default=20)
    parser.add_argument("--presets", nargs="+", default=PRESET_NAMES)
    parser.add_argument("--schemes", nargs="+", default=SCHEMES)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--no-search", action="store_true",
                        help="time the heuristic's direct tiles only (stages included)")
    args = parser.parse_args()
    copy_GBps, read_GBps = _bandwidths(1 << 28, "cuda", None)
    print(f"read {read_GBps:.0f} GB/s, copy {copy_GBps:.0f} GB/s", flush=True)
    path = os.path.join(args.out, "direct-fp8-experiment.jsonl")
    for name in args.presets:
        preset = PRESETS[name]
        bf16 = make_weights(preset, torch.bfloat16, torch.device("cuda"))
        for scheme_name in args.schemes:
            weights = quantize_experts(bf16, scheme_name)
            for m in args.tokens:
                row = time_cell(preset, weights, scheme_name, m, args.rep_ms,
                                max(read_GBps, copy_GBps), search=not args.no_search)
                row["read_GBps"] = round(max(read_GBps, copy_GBps))
                print(json.dumps({k: v for k, v in row.items() if k != "trials_us"}),
                      flush=True)
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            del weights
            torch.cuda.empty_cache()
        del bf16
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
