"""Experiment: tail tiles (`ExpertsConfig.tail_block_m` = 64) against the heuristic's plain
128-row tiles, to settle whether the heuristic turns them on.

With 128-row tiles an expert's last block is partly padding: 18–20% of the rows computed
at 256 rows per expert on average (bench/NOTES.md, v3). Tail tiles pad runs to 64 rows,
compute them in 128-row pairs and the odd last 64-row block separately — two more
launches. For each preset and M where the heuristic takes 128-row tiles this times both
(CUDA-graph replay), counts the padding fraction of each plan, and checks the tail
variant against the float32 reference.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/tail_tiles_experiment.py --out $OUT
Writes tail-tiles-experiment.json under --out and prints one line per cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch
import triton

import moekit
from moekit import reference
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.tuning import default_config

TOKENS = (1024, 2048, 4096, 8192, 16384)


def padding(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> float:
    """Fraction of plan rows that are padding with runs padded to block_m."""
    counts = torch.bincount(topk_ids.flatten().long(), minlength=num_experts).double()
    padded = (torch.ceil(counts / block_m) * block_m).sum()
    return float(1 - counts.sum() / padded)


def time_cell(name, preset, w, m) -> dict | None:
    base = default_config(m, preset.num_experts, preset.top_k, preset.hidden, preset.inter)
    if base.block_m != 128:
        return None
    tail = dataclasses.replace(base, tail_block_m=64)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))

    def run(config):
        return moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                    activation=preset.activation, b13=w.b13, b2=w.b2,
                                    config=config)
    plain_us, tail_us = graph_replay_us(lambda: run(base)), graph_replay_us(lambda: run(tail))
    rows = slice(0, 256)
    f32 = lambda t: None if t is None else t.float()
    ref = reference.fused_experts(hidden[rows].float(), w.w13, w.w2, topk.ids[rows],
                                  topk.weights[rows], activation=preset.activation,
                                  b13=f32(w.b13), b2=f32(w.b2))
    err = ((run(tail)[rows].float() - ref).norm() / ref.norm()).item()
    row = {"preset": name, "M": m, "plain_us": round(plain_us, 2), "tail_us": round(tail_us, 2),
           "speedup": round(plain_us / tail_us, 3), "tail_rel_err": err,
           "padding_128": round(padding(topk.ids, preset.num_experts, 128), 4),
           "padding_64": round(padding(topk.ids, preset.num_experts, 64), 4)}
    print(f"{name} M={m}: plain {row['plain_us']} µs, tail {row['tail_us']} µs "
          f"({row['speedup']}×), padding {row['padding_128']:.1%} → {row['padding_64']:.1%}, "
          f"rel_err {err:.1e}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    rows = []
    for name in args.presets:
        preset = PRESETS[name]
        weights = make_weights(preset, torch.bfloat16, torch.device("cuda"))
        rows += [r for m in args.tokens if (r := time_cell(name, preset, weights, m))]
        del weights
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "git_commit": os.environ.get("MOEKIT_GIT_COMMIT"),
              "command": "bench/scripts/tail_tiles_experiment.py", "rows": rows}
    path = os.path.join(args.out, "tail-tiles-experiment.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
