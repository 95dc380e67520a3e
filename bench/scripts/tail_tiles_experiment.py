"""Experiment: tail tiles (`ExpertsConfig.tail_block_m`) against the heuristic's tiles.

The padding ceiling (`padding_ceiling_experiment.py`) measured 1.14–1.38× between random
and exactly even routing on the 128-row prefill cells. Tail tiles pad each expert's run
to 64 rows instead of 128 and compute a run's odd last 64-row block with a 64-row tile in
the same program, from a work list built on the GPU. For each cell this times, in CUDA-
graph replay: the layer with and without tail tiles, and each GEMM alone on its plan (so
a loss can be placed), and checks the tail-tile output against the float32 reference.
Each cell is printed and appended to tail-tiles-experiment.jsonl under --out.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/tail_tiles_experiment.py --out $OUT
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
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.dispatch import dispatch_plan
from moekit.experts import launch_gemm1, launch_gemm2, use_tma
from moekit.tuning import default_config

moekit._replay.enabled = False  # this script patches what the ops read: no replays

CELLS = [("qwen3-30b-a3b", (2048, 4096, 8192, 16384)), ("olmoe-1b-7b", (2048, 4096)),
         ("mixtral-8x7b", (1024, 2048, 4096)), ("gpt-oss-120b", (4096, 8192)),
         ("deepseek-v2-lite", (2048, 4096)), ("granite-3.0-3b-a800m", (1024, 4096)),
         ("deepseek-v3", (4096, 8192))]


def _tiles(gemm) -> list[int]:
    return [gemm.block_n, gemm.block_k, gemm.group_m, gemm.num_warps, gemm.num_stages]


def gemm_times(preset, w, hidden, topk, config) -> tuple[float, float]:
    """GEMM1 and GEMM2 alone (graph replay) on this configuration's plan."""
    E = preset.num_experts
    tail = config.tail_block_m
    plan = dispatch_plan(topk.ids, E, tail or config.block_m,
                         tile_m=config.block_m if tail else None)
    tma = use_tma(hidden, w.w13, w.w2, config.block_m)
    act = moekit.Activation.parse(preset.activation)

    def gemm1():
        return launch_gemm1(hidden, w.w13, w.b13, topk.weights, plan, act.kind, act.alpha,
                            act.limit, False, _tiles(config.gemm1), tma)
    inter = gemm1()
    gemm2 = lambda: launch_gemm2(inter, w.w2, w.b2, topk.weights, plan, True,  # noqa: E731
                                 _tiles(config.gemm2), tma)
    return graph_replay_us(gemm1), graph_replay_us(gemm2)


def time_cell(name: str, m: int, rep_ms: float) -> dict:
    preset = PRESETS[name]
    device = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, device)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, device)
    base = default_config(m, preset.num_experts, preset.top_k, preset.hidden, preset.inter)
    tail = dataclasses.replace(base, tail_block_m=base.block_m // 2)

    def layer(config):
        return lambda: moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                            activation=preset.activation, b13=w.b13, b2=w.b2,
                                            config=config)
    base_us, tail_us = graph_replay_us(layer(base), rep_ms), graph_replay_us(layer(tail), rep_ms)
    (b1, b2), (t1, t2) = gemm_times(preset, w, hidden, topk, base), gemm_times(
        preset, w, hidden, topk, tail)
    out = layer(tail)()
    rows = slice(0, 256)
    f32 = lambda t: None if t is None else t.float()
    ref = reference.fused_experts(hidden[rows].float(), w.w13, w.w2, topk.ids[rows],
                                  topk.weights[rows], activation=preset.activation,
                                  b13=f32(w.b13), b2=f32(w.b2))
    err = ((out[rows].float() - ref).norm() / ref.norm()).item()
    return {"device": torch.cuda.get_device_name(), "preset": name, "M": m,
            "git_commit": os.environ.get("MOEKIT_GIT_COMMIT"), "block_m": base.block_m,
            "base_us": round(base_us, 1), "tail_us": round(tail_us, 1),
            "speedup": round(base_us / tail_us, 3),
            "gemm1_us": [round(b1, 1), round(t1, 1)], "gemm2_us": [round(b2, 1), round(t2, 1)],
            "tail_rel_err": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rep-ms", type=float, default=30)
    args = parser.parse_args()
    path = os.path.join(args.out, "tail-tiles-experiment.jsonl")
    for name, tokens in CELLS:
        for m in tokens:
            row = time_cell(name, m, args.rep_ms)
            print(json.dumps(row), flush=True)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
