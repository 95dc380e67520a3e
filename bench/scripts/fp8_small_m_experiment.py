"""fp8 at small and mid M on the plan path: the other column width for either GEMM.

The bf16 16-row blocks gained 1.045× on mixtral from GEMM2 at 128 columns instead of 64
(session 27: 448 programs each streaming 1.8 MB of w2 made 1.7 rounds; 224 fit one). The
fp8 plan path's tiles (`moekit.experts_fp8.plan_fp8_config`) take 64-column GEMM2 tiles at
≤ 32-row blocks too, and mixtral's fp8 cells at M = 64–256 sit at 76–78% of the roofline
(`h200-20261203-kernels-fp8_tensor-s22.md`). This times the whole `fused_experts_fp8` call
at its shipped configuration and with GEMM1's, GEMM2's or both column tiles at the other
width (64 ↔ 128), per-tensor and block scales, graph replay, L2 read-flushed, four rounds
in rotated order; outputs compared bitwise with the shipped one's.

    PYTHONPATH=src python3 bench/scripts/fp8_small_m_experiment.py --out $OUT
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from half_tile_experiment import run_cells  # this directory: the command line and rows
from small_m_experiment import SHARDS  # mixtral's tensor-parallel shards

import moekit
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.experts_fp8 import _check_config, _select_fp8_config
from moekit.quant import QuantScheme

SCHEMES = ("fp8_tensor", "fp8_block")
CELLS = ([("mixtral-8x7b", m) for m in (8, 32, 64, 128)] + [("mixtral-8x7b/tp2", 8)]
         + [(name, m) for name in ("qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite")
            for m in (64, 256)])


def _other_width(gemm):
    return dataclasses.replace(gemm, block_n=128 if gemm.block_n == 64 else 64)


def run_cell(name: str, m: int, log) -> dict:
    preset = SHARDS.get(name) or PRESETS[name]
    dev = torch.device("cuda")
    bf16 = make_weights(preset, torch.bfloat16, dev)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, dev)
    row = {"preset": name, "M": m}
    for dtype in SCHEMES:
        scheme = QuantScheme.parse(dtype)
        w = quantize_experts(bf16, dtype)
        shipped = _select_fp8_config(hidden, preset.num_experts, preset.top_k, preset.inter,
                                     scheme)
        if shipped.direct or shipped.block_m == 128:
            log(f"{name} M={m} {dtype}: {shipped.as_ints()} (direct or 128 rows), skipped")
            continue
        variants = {"shipped": shipped,
                    "gemm1": dataclasses.replace(shipped, gemm1=_other_width(shipped.gemm1)),
                    "gemm2": dataclasses.replace(shipped, gemm2=_other_width(shipped.gemm2))}
        variants["both"] = dataclasses.replace(variants["gemm1"], gemm2=variants["gemm2"].gemm2)
        for label in list(variants):
            try:
                _check_config(variants[label], scheme)
            except ValueError:
                del variants[label]

        def layer(config, w=w, scheme=scheme):
            return moekit.fused_experts_fp8(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                            scheme=scheme, b13=w.b13, b2=w.b2,
                                            activation=preset.activation, config=config)

        ref = layer(shipped)
        cell = {"configs": {k: c.as_ints() for k, c in variants.items()},
                "equal": {k: bool(torch.equal(ref, layer(c))) for k, c in variants.items()}}
        labels = list(variants)
        for r in range(4):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                cell.setdefault(f"{label}_us", []).append(
                    graph_replay_us(lambda c=variants[label]: layer(c)))
        row[dtype] = cell
        best = {label: min(cell[f"{label}_us"]) for label in labels}
        log(f"{name} M={m} {dtype}: " + ", ".join(
            f"{label} {best[label]:.1f} ({best['shipped'] / best[label]:.3f}×)"
            for label in labels) + f"; shipped {shipped.as_ints()}")
    return row if len(row) > 2 else {}


if __name__ == "__main__":
    sys.exit(run_cells("fp8-small-m-experiment", CELLS, run_cell))
