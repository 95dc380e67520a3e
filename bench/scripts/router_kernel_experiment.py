"""The router GEMM alone: `moekit.routing.router_logits` against `nn.Linear` (cuBLAS), the
GPU's time in CUDA-graph replay (L2 flushed), per preset's router [E, H] and token count.

The layer can take the kernel in every mode only where its GPU time is cuBLAS's or less
(bench/NOTES.md, session 32: the dot kernel was 1.5–3 µs behind at decode).

    PYTHONPATH=src python3 bench/scripts/router_kernel_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from moekit.bench.experiment_files import experiment_meta, write_experiment
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.routing import router_logits

PRESET_NAMES = ["qwen3-30b-a3b", "granite-3.0-3b-a800m", "olmoe-1b-7b", "mixtral-8x7b",
                "deepseek-v3"]
TOKENS = [1, 2, 4, 8, 16, 64]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--stem", default="router-kernel-experiment")
    args = parser.parse_args()
    rows = []
    for name in PRESET_NAMES:
        preset = PRESETS[name]
        weight = torch.randn(preset.num_experts, preset.hidden, device="cuda",
                             dtype=torch.bfloat16) / preset.hidden**0.5
        for m in TOKENS:
            hidden = torch.randn(m, preset.hidden, device="cuda", dtype=torch.bfloat16)
            ours = graph_replay_us(lambda h=hidden, w=weight: router_logits(h, w), rep_ms=30)
            cublas = graph_replay_us(lambda h=hidden, w=weight: F.linear(h, w), rep_ms=30)
            diff = (router_logits(hidden, weight).float() - F.linear(hidden, weight).float())
            rows.append({"preset": name, "E": preset.num_experts, "H": preset.hidden, "M": m,
                         "kernel_us": round(ours, 2), "cublas_us": round(cublas, 2),
                         "ratio": round(cublas / ours, 3),
                         "max_abs_diff": float(diff.abs().max())})
            print(rows[-1], flush=True)
    notes = ["- CUDA-graph replay µs, median, L2 flushed; bf16; ratio = cuBLAS ÷ kernel; "
             "max |diff| of the logits (fp32 sums in another order, rounded to bf16)"]
    table = ["| preset | E | H | M | kernel | cuBLAS | ratio | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['preset']} | {r['E']} | {r['H']} | {r['M']} | {r['kernel_us']} | "
              f"{r['cublas_us']} | {r['ratio']} | {r['max_abs_diff']:.2e} |" for r in rows]
    write_experiment(args.out, args.stem, experiment_meta(), rows,
                     "The router GEMM: moekit's kernel against cuBLAS", notes, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
