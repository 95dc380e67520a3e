"""Experiment: fp8 tiles at mid and prefill token counts, the heuristic against a few
candidate rules, to settle `default_fp8_config` beyond the one cell `moekit tune` swept.

`moekit tune --dtype fp8_tensor` on qwen3 M=4096 found 64-row tiles with 4 warps and
64-deep K tiles for both GEMMs 6% faster than the heuristic's 8-warp, 128-deep ones
(`h100-sxm-20261123-tune-fp8_tensor-qwen3.json`). This times that and its neighbours on
every scheme and a few presets, CUDA-graph replay, and checks each output against the
heuristic's (the same quantised operands: only the accumulation order differs).

Usage (on the device): PYTHONPATH=src python3 bench/scripts/fp8_tile_experiment.py --out $OUT
Writes fp8-tile-experiment.json under --out and prints one line per cell.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

import moekit
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.experts_fp8 import default_fp8_config
from moekit.quant import QuantScheme
from moekit.quant.scheme import PRESET_NAMES
from moekit.tuning import ExpertsConfig, GemmConfig

TOKENS = (1024, 4096)
CANDIDATES = {  # label → (GEMM1 tile, GEMM2 tile) at 64 rows: (block_n, block_k, warps, stages)
    "n128 k64 w4 s4": ((128, 64, 4, 4), (128, 64, 4, 4)),  # the tuned qwen3 M=4096 cell
    "n128 k128 w4 s3": ((128, 128, 4, 3), (128, 128, 4, 3)),
    "n128 k64 w8 s4": ((128, 64, 8, 4), (128, 64, 8, 4)),
    "g1 k64 w4, g2 n256 k64 w8": ((128, 64, 4, 4), (256, 64, 8, 3)),
}


def candidate(tiles) -> ExpertsConfig:
    (n1, k1, w1, s1), (n2, k2, w2, s2) = tiles
    return ExpertsConfig(64, GemmConfig(n1, k1, 8, w1, s1), GemmConfig(n2, k2, 8, w2, s2))


def time_cell(name, preset, weights, scheme, m) -> dict:
    """One cell: each configuration's graph-replay µs and its difference from the heuristic."""
    hidden, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
    parsed = QuantScheme.parse(scheme)
    configs = {"heuristic": default_fp8_config(m, preset.num_experts, preset.top_k,
                                               preset.hidden, preset.inter, parsed),
               **{label: candidate(t) for label, t in CANDIDATES.items()}}

    def run(config):
        return moekit.fused_experts_fp8(hidden, weights.w13, weights.w2, topk.ids, topk.weights,
                                        scheme=parsed, activation=preset.activation,
                                        b13=weights.b13, b2=weights.b2, config=config)
    reference = run(configs["heuristic"]).float()
    row = {"preset": name, "scheme": scheme, "M": m}
    for label, config in configs.items():
        try:
            us = graph_replay_us(lambda c=config: run(c))
            diff = ((run(config).float() - reference).norm() / reference.norm()).item()
        except Exception as exc:  # a tile the scheme or the GPU rules out
            row[label] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
            continue
        row[label] = {"us": round(us, 2), "rel_diff": diff, "config": str(config)}
    timed = [k for k in configs if "us" in row[k]]
    best = min(timed, key=lambda k: row[k]["us"])
    row["best"], row["speedup"] = best, round(row["heuristic"]["us"] / row[best]["us"], 3)
    print(f"{name} {scheme} M={m}: heuristic {row['heuristic']['us']} µs; "
          + ", ".join(f"{k} {row[k]['us']}" for k in timed if k != "heuristic")
          + f" → best {best} ({row['speedup']}×)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+",
                        default=["qwen3-30b-a3b", "mixtral-8x7b", "olmoe-1b-7b"])
    parser.add_argument("--schemes", nargs="+", default=list(PRESET_NAMES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    rows = []
    for name in args.presets:
        preset = PRESETS[name]
        bf16 = make_weights(preset, torch.bfloat16, torch.device("cuda"))
        for scheme in args.schemes:
            weights = quantize_experts(bf16, scheme)
            rows += [time_cell(name, preset, weights, scheme, m) for m in args.tokens]
            del weights
        del bf16
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "command": "bench/scripts/fp8_tile_experiment.py",
              "rows": rows}
    path = os.path.join(args.out, "fp8-tile-experiment.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
