"""Would splitting the fp8 decode GEMM2's K loop over more programs pay? A proxy, no new kernel.

At mixtral M = 1 the plan path's fp8 GEMM2 runs 128 programs (2 experts × 4096 / 64
columns), one an SM, each walking all 14336 of I in 112 one-group steps; it streams at
~65% of the DRAM bandwidth, and neither deeper pipelines nor narrower tiles help
(session 67's depth run). A plain TMA or pointer read of the same bytes by the same 128
programs reaches 81% of a contiguous stream at 4 stages and 94% when K is split over 256
programs (`tile_read_experiment.py`, session 67).

The proxy: the same preset with top_k × S and I / S. At M = 1 it reads exactly the bytes
of the original (S times the experts, each 1/S as wide), its GEMM1 runs as many programs
of as many K steps (the column tiles of S·k experts of I / S), and its GEMM2 runs S times
the programs of 1/S the steps — what a K split of GEMM2 would launch, less the partial
sums it would add. Both run the original's shipped config; the layer's time difference
is what the split could win (the combine adds S·k rows instead of k: noise at M = 1).

    PYTHONPATH=src python3 bench/scripts/fp8_gemm2_split_proxy.py --out $OUT \\
        [--cells mixtral-8x7b:1] [--splits 2 4] [--schemes fp8_tensor fp8_block]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

import moekit
from moekit.bench.experiment_files import experiment_meta, rows_table, write_experiment
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.experts_fp8 import _select_fp8_config
from moekit.quant import QuantScheme

STEM = "fp8-gemm2-split-proxy"


def layer_fn(preset, m: int, scheme: str, config):
    """A graph-replayable call of the fp8 layer of `preset` at M = m under `config`."""
    dev = torch.device("cuda")
    w = quantize_experts(make_weights(preset, torch.bfloat16, dev), scheme)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, dev)
    q = QuantScheme.parse(scheme)
    if config is None:
        config = _select_fp8_config(hidden, preset.num_experts, preset.top_k, preset.inter, q)

    def call():
        return moekit.fused_experts_fp8(hidden, w.w13, w.w2, topk.ids, topk.weights, scheme=q,
                                        b13=w.b13, b2=w.b2, activation=preset.activation,
                                        config=config)
    call()
    return call, config


def run_cell(name: str, m: int, scheme: str, splits: list[int], rounds: int, log) -> dict:
    """The original and each split proxy at the original's shipped config: µs per round."""
    preset = PRESETS[name]
    fns = {}
    fn, shipped = layer_fn(preset, m, scheme, None)
    fns["original"] = fn
    for s in splits:
        proxy = dataclasses.replace(preset, name=f"{name}/{s}", top_k=preset.top_k * s,
                                    inter=preset.inter // s)
        if preset.inter % (128 * s) or proxy.top_k > preset.num_experts:
            log(f"{name} M={m} {scheme} split {s}: no proxy (I or k do not divide)")
            continue
        fns[f"split{s}"] = layer_fn(proxy, m, scheme, shipped)[0]
    samples = {label: [] for label in fns}
    labels = list(fns)
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            samples[label].append(graph_replay_us(fns[label], rep_ms=30))
    row = {"preset": name, "M": m, "scheme": scheme, "config": str(shipped.as_ints())}
    for label in labels:
        row[f"{label}_us"] = round(min(samples[label]), 2)
        row[f"orig/{label}"] = round(min(samples["original"]) / min(samples[label]), 3)
    log(" ".join(f"{k}={v}" for k, v in row.items()))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--cells", nargs="+", default=["mixtral-8x7b:1"], metavar="PRESET:M")
    parser.add_argument("--splits", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--schemes", nargs="+", default=["fp8_tensor", "fp8_block"])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    meta = experiment_meta(rounds=args.rounds)
    notes = ["- the layer at the original preset and at its split proxies (top_k × S, I / S: "
             "the same bytes and GEMM1 programs, S times GEMM2's programs of 1/S the K steps), "
             "all at the original's shipped config; graph replay, L2 read-flushed, best of "
             f"{args.rounds} rounds in rotated order; orig/x > 1: the proxy is faster"]
    rows = []
    for text in args.cells:
        name, m = text.rsplit(":", 1)
        for scheme in args.schemes:
            rows.append(run_cell(name, int(m), scheme, args.splits, args.rounds, print))
            keys = list(dict.fromkeys(k for row in rows for k in row))
            write_experiment(args.out, STEM, meta, rows,
                             "fp8 decode: would a K-split GEMM2 pay? (proxy)", notes,
                             rows_table([{k: row.get(k, "—") for k in keys} for row in rows],
                                        keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
