"""Experiment: the plan path's decode tiles (M = 8–64, 16-row blocks) around the heuristic.

The fp8 plan path's GEMMs at M = 16–64 run at 81–89% of their bytes' floor on an H100
(`h100-sxm-20261207-fp8-kernel-profile-mid-s70.json`), and the last sweeps of these cells
were on an H200 (session 39: qwen3 M = 8 found GEMM1 at 3 stages 1.067× the heuristic's
4; M = 16 and 64 found nothing). This times the heuristic against one change at a time —
GEMM1's stages and width, GEMM2's width and stages — on the H100, CUDA-graph replay, L2
read-flushed, the variants' order rotated by round, and checks each output against the
heuristic's (the same operands: only the accumulation order may differ).

Usage (on the device):
    PYTHONPATH=src python3 bench/scripts/plan_decode_tiles_experiment.py --out $OUT \\
        --cells qwen3-30b-a3b:8 olmoe-1b-7b:16 --dtypes fp8_tensor bf16 \\
        [--variants "g1 stages 3" "g2 n32"]
Writes plan-decode-tiles-experiment.{json,md} under --out (after every cell, so a run cut
short keeps what it timed) and prints one line per cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

import torch

import moekit
from moekit._tma import heuristic_sms
from moekit.bench.experiment_files import experiment_meta, write_experiment
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.experts import default_config
from moekit.experts_fp8 import default_fp8_config
from moekit.tuning import GemmConfig
from moekit.tuning.heuristic import HOPPER_SMS

STEM = "plan-decode-tiles-experiment"
TITLE = "The plan path's decode tiles around the heuristic"
CELLS = (("qwen3-30b-a3b", 8), ("qwen3-30b-a3b", 16), ("qwen3-30b-a3b", 32),
         ("qwen3-30b-a3b", 64), ("olmoe-1b-7b", 8), ("olmoe-1b-7b", 16), ("olmoe-1b-7b", 32),
         ("deepseek-v2-lite", 8), ("deepseek-v2-lite", 16), ("deepseek-v2-lite", 32),
         ("granite-3.0-3b-a800m", 16))
# label → (which GEMM, the GemmConfig fields it changes)
VARIANTS = {
    "g1 stages 3": ("gemm1", {"num_stages": 3}),
    "g1 stages 5": ("gemm1", {"num_stages": 5}),
    "g1 n64": ("gemm1", {"block_n": 64}),
    "g2 n128 s3": ("gemm2", {"block_n": 128, "num_stages": 3}),
    "g2 n32": ("gemm2", {"block_n": 32}),
    "g2 stages 6": ("gemm2", {"num_stages": 6}),
}


def parse_cell(text: str) -> tuple[str, int]:
    """"PRESET:M" → (preset name, M), rejecting unknown presets and non-positive M."""
    name, _, m = text.partition(":")
    if name not in PRESETS or not m.isdigit() or int(m) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want PRESET:M with a known preset, M ≥ 1")
    return name, int(m)


def heuristic(preset, m: int, dtype: str, sms: int = HOPPER_SMS):
    """The configuration the library picks by default for this cell on a GPU of `sms` SMs
    (no tuned table)."""
    if dtype == "bf16":
        return default_config(m, preset.num_experts, preset.top_k, preset.hidden, preset.inter,
                              2, sms)
    return default_fp8_config(m, preset.num_experts, preset.top_k, preset.hidden,
                              preset.inter, dtype, sms)


def variant(config, gemm: str, change: dict):
    """`config` with one GEMM's tile fields changed."""
    tile: GemmConfig = getattr(config, gemm)
    return dataclasses.replace(config, **{gemm: dataclasses.replace(tile, **change)})


def time_cell(name: str, m: int, dtype: str, weights, rounds: int, rep_ms: float,
              chosen: list[str]) -> dict:
    """Each configuration's median graph-replay µs over the rounds, its ratio to the
    heuristic's (> 1 faster) and its output's relative difference from the heuristic's."""
    preset = PRESETS[name]
    hidden, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
    base = heuristic(preset, m, dtype, heuristic_sms(hidden.device))
    configs = {"heuristic": base}
    for label, (gemm, change) in VARIANTS.items():
        if label in chosen:
            configs[label] = variant(base, gemm, change)
    configs = {k: c for k, c in configs.items() if k == "heuristic" or c != base}

    def run(config):
        if dtype == "bf16":
            return moekit.fused_experts(hidden, weights.w13, weights.w2, topk.ids,
                                        topk.weights, activation=preset.activation,
                                        b13=weights.b13, b2=weights.b2, config=config)
        return moekit.fused_experts_fp8(hidden, weights.w13, weights.w2, topk.ids,
                                        topk.weights, scheme=dtype,
                                        activation=preset.activation, b13=weights.b13,
                                        b2=weights.b2, config=config)

    reference = run(base).float()
    row = {"preset": name, "M": m, "dtype": dtype, "heuristic": str(base), "variants": {}}
    samples: dict[str, list[float]] = {k: [] for k in configs}
    labels = list(configs)
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            if label in row["variants"]:  # failed in an earlier round: not again
                continue
            try:
                samples[label].append(graph_replay_us(lambda c=configs[label]: run(c),
                                                      rep_ms=rep_ms))
            except Exception as exc:  # a tile the kernel rules out
                row["variants"][label] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    base_us = statistics.median(samples["heuristic"])
    for label, config in configs.items():
        if label in row["variants"]:
            continue
        us = statistics.median(samples[label])
        out = run(config).float()
        row["variants"][label] = {
            "us": round(us, 2), "ratio": round(base_us / us, 3), "config": str(config),
            "rel_diff": ((out - reference).norm() / reference.norm()).item()}
    shown = ", ".join(f"{k} {v['ratio']}" for k, v in row["variants"].items()
                      if k != "heuristic" and "ratio" in v)
    print(f"{name} M={m} {dtype}: heuristic {base_us:.2f} µs; {shown}", flush=True)
    return row


def table(rows: list[dict], chosen: list[str]) -> list[str]:
    """The heuristic's µs and each chosen variant's ratio to it, one row per cell."""
    labels = ["heuristic", *chosen]
    lines = ["| preset | M | dtype | " + " | ".join(labels) + " |",
             "|---|---|---|" + "---|" * len(labels)]
    for row in rows:
        cells = []
        for label in labels:
            v = row["variants"].get(label)
            if v is None:
                cells.append("—")
            elif "error" in v:
                cells.append("error")
            else:
                cells.append(f"{v['us']:.1f}" if label == "heuristic" else f"{v['ratio']:.3f}")
        lines.append(f"| {row['preset']} | {row['M']} | {row['dtype']} | "
                     + " | ".join(cells) + " |")
    worst = max((v["rel_diff"] for row in rows for v in row["variants"].values()
                 if "rel_diff" in v), default=0.0)
    return lines + ["", f"Largest output difference from the heuristic's: {worst:.2e}."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", type=parse_cell, default=list(CELLS),
                        metavar="PRESET:M")
    parser.add_argument("--dtypes", nargs="+", default=["fp8_tensor"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=list(VARIANTS), help="default: every tile variant")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rep-ms", type=float, default=25)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    meta = experiment_meta(rounds=args.rounds, rep_ms=args.rep_ms)
    notes = [f"- graph replay, L2 read-flushed, median of {args.rounds} rotated rounds",
             "- cells: the heuristic's µs; the others heuristic ÷ variant (> 1 faster); — "
             "where a variant equals the heuristic"]
    rows = []
    for name in dict.fromkeys(n for n, _ in args.cells):
        bf16 = make_weights(PRESETS[name], torch.bfloat16, torch.device("cuda"))
        for dtype in args.dtypes:
            weights = bf16 if dtype == "bf16" else quantize_experts(bf16, dtype)
            for m in (m for n, m in args.cells if n == name):
                rows.append(time_cell(name, m, dtype, weights, args.rounds, args.rep_ms,
                                      args.variants))
                write_experiment(args.out, STEM, meta, rows, TITLE, notes,
                                 table(rows, args.variants))
            del weights
        del bf16
        torch.cuda.empty_cache()
    print(f"wrote {os.path.join(args.out, STEM)}.json and .md")


if __name__ == "__main__":
    main()
