"""How many programs should share each slot's K loop in the fp8 direct GEMM2?

At gpt-oss M = 1 the direct GEMM2 runs 180 programs (45 column tiles × 4 slots) of 23
K steps on 132 SMs: 17.1 µs against a 10.3 µs floor (session 67's kernel profile). The
plan path's GEMM2 gained 1.07–1.08× at mixtral M = 1 from more programs of fewer steps
(`gemm2_k_parts`); `direct_gemm2_k_split` does the same for the direct path. This times
the whole layer (graph replay, L2 flushed) at the shipped direct config with the split
forced to each of `--splits`, in rotated rounds, so the rule's threshold comes from
measurement rather than from the plan path's.

    PYTHONPATH=src python3 bench/scripts/direct_k_split_experiment.py --out $OUT \\
        [--cells gpt-oss-120b:1 ...] [--splits 1 2 3 4] [--schemes fp8_tensor fp8_block]
"""

from __future__ import annotations

import argparse
import sys

import torch

import moekit
import moekit.experts_direct_fp8
from moekit.bench.experiment_files import experiment_meta, rows_table, write_experiment
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import get_preset
from moekit.bench.timing import graph_replay_us
from moekit.experts_direct import slot_parts
from moekit.experts_fp8 import _select_fp8_config
from moekit.quant import QuantScheme
from moekit.tuning.heuristic import direct_gemm2_k_split

STEM = "fp8-direct-k-split-experiment"
CELLS = ["gpt-oss-120b:1", "gpt-oss-120b:2", "deepseek-v2-lite:1", "qwen3-30b-a3b:1",
         "olmoe-1b-7b:1", "granite-3.0-3b-a800m:1"]


def forced_split(split: int | None) -> None:
    """Make the direct GEMM2 share each slot's K by `split` programs (None: the rule)."""
    moekit.experts_direct_fp8.direct_gemm2_k_split = (
        direct_gemm2_k_split if split is None else (lambda *args: split))


def run_cell(name: str, m: int, scheme: str, splits: list[int], rounds: int, log) -> dict:
    """The layer at each forced split and at the rule's: µs, best of `rounds`."""
    preset = get_preset(name)
    dev = torch.device("cuda")
    w = quantize_experts(make_weights(preset, torch.bfloat16, dev), scheme)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, dev)
    q = QuantScheme.parse(scheme)
    config = _select_fp8_config(hidden, preset.num_experts, preset.top_k, preset.inter, q)
    if not config.direct or slot_parts(preset.top_k, config.gemm2.group_m)[0] != 1:
        log(f"{name} M={m} {scheme}: no direct GEMM2 of one slot a program")
        return {"preset": name, "M": m, "scheme": scheme, "config": str(config.as_ints())}

    def call():
        return moekit.fused_experts_fp8(hidden, w.w13, w.w2, topk.ids, topk.weights, scheme=q,
                                        b13=w.b13, b2=w.b2, activation=preset.activation,
                                        config=config)

    labels = [*(f"split{s}" for s in splits), "rule"]
    forced = {**{f"split{s}": s for s in splits}, "rule": None}
    chosen = []
    forced_split(None)
    moekit.experts_direct_fp8.direct_gemm2_k_split = (
        lambda *args: chosen.append(direct_gemm2_k_split(*args)) or chosen[-1])
    reference = call().float()
    errors = {}
    for label in labels:
        forced_split(forced[label])
        out = call().float()
        errors[label] = float((out - reference).norm() / reference.norm())
    samples = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            forced_split(forced[label])
            samples[label].append(graph_replay_us(call, rep_ms=30))
    forced_split(None)
    row = {"preset": name, "M": m, "scheme": scheme, "rule_split": chosen[0],
           "config": str(config.as_ints())}
    base = min(samples["split1"]) if "split1" in samples else None
    for label in labels:
        row[f"{label}_us"] = round(min(samples[label]), 2)
        if base is not None:
            row[f"1/{label}"] = round(base / min(samples[label]), 3)
        row[f"{label}_rel_err"] = f"{errors[label]:.1e}"
    log(" ".join(f"{k}={v}" for k, v in row.items()))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--cells", nargs="+", default=CELLS, metavar="PRESET:M")
    parser.add_argument("--splits", nargs="+", type=int, default=[1, 2, 3, 4])
    parser.add_argument("--schemes", nargs="+", default=["fp8_tensor", "fp8_block"])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    meta = experiment_meta(rounds=args.rounds)
    notes = ["- the fp8 layer at the shipped direct config, the direct GEMM2's programs per "
             "slot forced to each split (`direct_gemm2_k_split`) and at the rule's "
             "(rule_split); graph replay, L2 read-flushed, best of "
             f"{args.rounds} rounds in rotated order; 1/x > 1: x is faster than one program a "
             "slot; rel_err: relative L2 against the rule's output"]
    rows = []
    for text in args.cells:
        name, m = text.rsplit(":", 1)
        for scheme in args.schemes:
            rows.append(run_cell(name, int(m), scheme, args.splits, args.rounds, print))
            keys = list(dict.fromkeys(k for row in rows for k in row))
            write_experiment(args.out, STEM, meta, rows,
                             "fp8 direct GEMM2: programs per slot's K loop", notes,
                             rows_table([{k: row.get(k, "—") for k in keys} for row in rows],
                                        keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
