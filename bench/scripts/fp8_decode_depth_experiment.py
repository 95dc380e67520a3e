"""fp8 decode on the plan path: do the 16/32-row GEMMs keep enough weight bytes in flight?

The plan path's fp8 GEMM2 at 16- and 32-row tiles streams 64 columns × 128 one-byte K
values a step, 4 stages (`moekit.experts_fp8.plan_fp8_config`): 24 KB in flight a program,
half of the bf16 tile of the same shape. At mixtral M = 1 its 128 programs (2 experts ×
4096 / 64) fill one SM each, so ~3 MB is in flight over the whole GPU — about what HBM3's
bandwidth × loaded latency needs, no margin. The fp8 decode cells of mixtral,
deepseek-v3 and gpt-oss sit at 55–84% of the roofline on the H100 where bf16 reaches
~90% (bench/results/h100-sxm-20261207-kernels-fp8_tensor-s62.md). This times the whole
`fused_experts_fp8` call (graph replay, L2 read-flushed, rounds in rotated order) at its
shipped configuration and with deeper weight pipelines in either GEMM, or GEMM2's column
tile halved (twice the programs) or doubled; outputs are compared bitwise with the shipped
one's (only the 32-column GEMM2 differs: too narrow for the swapped fp8 MMA's 64 rows, it
converts its operands and rounds otherwise). GEMM2's K tile stays 128: its input's 1×128
scale groups bound it. The direct path's cells (gpt-oss and deepseek-v3 at M = 1) take the
same variants of its own tiles.

Answer on an H100 (session 63, `bench/results/h100-sxm-20261207-fp8-decode-depth-
experiment-s63.md`): no variant helps (0.92–1.02×); each K step waits on a scale load
instead (bench/NOTES.md, session 63). That was with the swapped dots promoting every 32
products (four serial MMA waits a step); at every 128 (session 65) the mixtral M = 1
GEMM2's stall samples sit first on the weight tile's cp.async wait (session 66), so
`device_check.sh depth` asks again.

    PYTHONPATH=src python3 bench/scripts/fp8_decode_depth_experiment.py --out $OUT \
        [--cells mixtral-8x7b:1 ...] [--schemes fp8_tensor fp8_block] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

import moekit
from moekit.bench.experiment_files import experiment_meta, write_experiment
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.experts_fp8 import _check_config, _select_fp8_config
from moekit.quant import QuantScheme

STEM = "fp8-decode-depth-experiment"
LABELS = ["shipped", "g2_s6", "g2_s8", "g2_n32", "g2_n128", "g1_s5", "g1_n64", "both_s"]
CELLS = ["gpt-oss-120b:1", "deepseek-v3:1", "mixtral-8x7b:1", "mixtral-8x7b:4",
         "mixtral-8x7b:16", "deepseek-v3:2", "deepseek-v3:8", "gpt-oss-120b:4",
         "gpt-oss-120b:16", "gpt-oss-120b:64",
         "qwen3-30b-a3b:16", "qwen3-30b-a3b:64", "olmoe-1b-7b:64"]


def variants(shipped):
    """The shipped config and its deeper or wider weight pipelines, by label."""
    g1, g2 = shipped.gemm1, shipped.gemm2
    return {
        "shipped": shipped,
        "g2_s6": dataclasses.replace(shipped, gemm2=dataclasses.replace(g2, num_stages=6)),
        "g2_s8": dataclasses.replace(shipped, gemm2=dataclasses.replace(g2, num_stages=8)),
        "g2_n32": dataclasses.replace(shipped, gemm2=dataclasses.replace(g2, block_n=32)),
        "g2_n128": dataclasses.replace(shipped, gemm2=dataclasses.replace(g2, block_n=128)),
        "g1_s5": dataclasses.replace(shipped, gemm1=dataclasses.replace(g1, num_stages=5)),
        "g1_n64": dataclasses.replace(shipped, gemm1=dataclasses.replace(g1, block_n=64)),
        "both_s": dataclasses.replace(shipped, gemm1=dataclasses.replace(g1, num_stages=5),
                                      gemm2=dataclasses.replace(g2, num_stages=6)),
    }


def run_cell(name: str, m: int, schemes: list[str], rounds: int, log) -> list[dict]:
    """One row per scheme: each variant's config, bitwise equality, relative difference
    and µs per round."""
    preset = PRESETS[name]
    dev = torch.device("cuda")
    bf16 = make_weights(preset, torch.bfloat16, dev)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, dev)
    rows = []
    for dtype in schemes:
        scheme = QuantScheme.parse(dtype)
        w = quantize_experts(bf16, dtype)
        shipped = _select_fp8_config(hidden, preset.num_experts, preset.top_k, preset.inter,
                                     scheme)
        if shipped.block_m == 128:
            log(f"{name} M={m} {dtype}: {shipped.as_ints()} (128 rows), skipped")
            continue
        configs = {}
        for label, config in variants(shipped).items():
            try:
                _check_config(config, scheme, on_gpu=True)
            except ValueError as e:
                log(f"{name} M={m} {dtype} {label}: refused ({e})")
                continue
            if label == "shipped" or config != shipped:
                configs[label] = config

        def layer(config, w=w, scheme=scheme):
            return moekit.fused_experts_fp8(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                            scheme=scheme, b13=w.b13, b2=w.b2,
                                            activation=preset.activation, config=config)

        ref = layer(shipped).clone()
        cell = {"preset": name, "M": m, "scheme": dtype,
                "configs": {k: c.as_ints() for k, c in configs.items()}, "equal": {},
                "rel_diff": {}}
        for label, config in list(configs.items()):
            try:
                got = layer(config)
            except Exception as e:  # e.g. more shared memory than an SM has
                log(f"{name} M={m} {dtype} {label}: failed ({type(e).__name__}: {e})"[:300])
                del configs[label]
                continue
            cell["equal"][label] = bool(torch.equal(ref, got))
            cell["rel_diff"][label] = float(
                ((got.float() - ref.float()).norm() / ref.float().norm()).item())
        labels = list(configs)
        for r in range(rounds):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                cell.setdefault(f"{label}_us", []).append(
                    graph_replay_us(lambda c=configs[label]: layer(c), rep_ms=30))
        rows.append(cell)
        best = {label: min(cell[f"{label}_us"]) for label in labels}
        log(f"{name} M={m} {dtype}: " + ", ".join(
            f"{label} {best[label]:.1f} ({best['shipped'] / best[label]:.3f}×"
            f"{'' if cell['equal'][label] else ' ≠'})" for label in labels)
            + f"; shipped {shipped.as_ints()}")
    return rows


def table(rows: list[dict]) -> list[str]:
    """Shipped µs, then shipped ÷ variant per variant (best of the rounds; > 1: the variant
    is faster; ≠: its output differs from the shipped one's)."""
    lines = ["| preset | M | scheme | shipped µs | " + " | ".join(LABELS[1:]) + " |",
             "|" + "---|" * (3 + len(LABELS))]
    for row in rows:
        best = {label: min(row[f"{label}_us"]) for label in LABELS if f"{label}_us" in row}
        cells = [f"{best['shipped'] / best[label]:.3f}"
                 + ("" if row["equal"][label] else " ≠") if label in best else "—"
                 for label in LABELS[1:]]
        lines.append(f"| {row['preset']} | {row['M']} | {row['scheme']} | "
                     f"{best['shipped']:.1f} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--cells", nargs="*", default=CELLS, metavar="PRESET:M")
    parser.add_argument("--schemes", nargs="+", default=["fp8_tensor"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    meta = experiment_meta(rounds=args.rounds)
    notes = ["- variants: GEMM2 at 6 or 8 stages (`g2_s6`, `g2_s8`), 32- or 128-column tiles "
             "(`g2_n32`, `g2_n128`); GEMM1 at 5 stages (`g1_s5`) or 64 columns (`g1_n64`); both "
             "deeper (`both_s`); — where a variant is the shipped config or is refused",
             f"- graph replay, L2 read-flushed, {args.rounds} rounds in rotated order; best "
             "of the rounds; columns after the first: shipped ÷ variant (> 1: faster)"]
    rows = []
    for text in args.cells:
        name, m = text.rsplit(":", 1)
        rows += run_cell(name, int(m), args.schemes, args.rounds, print)
        write_experiment(args.out, STEM, meta, rows,
                         "fp8 decode: deeper weight pipelines on the plan path", notes,
                         table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
