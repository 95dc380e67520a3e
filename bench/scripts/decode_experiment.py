"""Experiment: the decode path (block_m = 1: no plan, GEMM2 + combine fused) against the
plan path the heuristic picks, at decode token counts.

For each preset and M it times CUDA-graph replays of `fused_experts` with the heuristic's
configuration and with the decode path at a few GEMM2-combine column tiles, checks each
against the float32 reference, and reports the speedup of the best decode variant. The
heuristic should pick the decode path only where this shows it winning.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/decode_experiment.py --out $OUT
Writes decode-experiment.json under --out and prints one line per cell.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

import moekit
from moekit import reference
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.tuning import ExpertsConfig, GemmConfig, default_config
from moekit.tuning.heuristic import tiles_for_block_m

TOKENS = (1, 2, 4, 8, 16)
GEMM2_COLUMNS = (16, 32, 64)  # the fused GEMM2 + combine's column tile


def variants() -> dict[str, ExpertsConfig]:
    base = tiles_for_block_m(1)
    return {f"decode n2={n}": ExpertsConfig(1, base.gemm1, GemmConfig(n, 128, 8, 4, 4))
            for n in GEMM2_COLUMNS}


def rel_err(out: torch.Tensor, preset, w, hidden, topk) -> float:
    f32 = lambda t: None if t is None else t.float()
    ref = reference.fused_experts(hidden.float(), w.w13, w.w2, topk.ids, topk.weights,
                                  activation=preset.activation, b13=f32(w.b13), b2=f32(w.b2))
    return ((out.float() - ref).norm() / ref.norm()).item()


def time_cell(name: str, preset, w, m: int) -> dict:
    """One (preset, M) cell: every configuration's graph-replay µs and error."""
    hidden, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
    configs = {"heuristic": default_config(m, preset.num_experts, preset.top_k, preset.hidden,
                                           preset.inter), **variants()}
    row = {"preset": name, "M": m}
    for label, config in configs.items():
        def call(c=config):
            return moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                        activation=preset.activation, b13=w.b13, b2=w.b2,
                                        config=c)
        row[label] = {"us": round(graph_replay_us(call), 2),
                      "rel_err": rel_err(call(), preset, w, hidden, topk)}
    best = min((k for k in configs if k != "heuristic"), key=lambda k: row[k]["us"])
    row["best_decode"] = best
    row["speedup"] = round(row["heuristic"]["us"] / row[best]["us"], 3)
    print(f"{name} M={m}: heuristic {row['heuristic']['us']} µs, {best} {row[best]['us']} µs "
          f"({row['speedup']}×), rel_err {row[best]['rel_err']:.1e}", flush=True)
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
        rows += [time_cell(name, preset, weights, m) for m in args.tokens]
        del weights
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "command": "bench/scripts/decode_experiment.py",
              "rows": rows}
    path = os.path.join(args.out, "decode-experiment.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
