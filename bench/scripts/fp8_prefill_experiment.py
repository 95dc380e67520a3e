"""Experiment: fp8 prefill tiles — 128-row tiles (TMA, persistent GEMM2, tail tiles,
GEMM1 in two column halves) against the 64-row tiles fp8 ran with until now.

fp8 prefill sat at 34–36% of the fp8 peak on qwen3 with 64-row tiles: at 128 rows GEMM1
spilled, from its promoted accumulators (two per product, two products) and from weight
scales held as [BLOCK_N] vectors that one scalar could stand for. For every cell this
times, in CUDA-graph replay, the layer under each configuration below (same fp8
operands) and checks each output against the quantised float32 reference on 256 sampled
rows. The fp8 peak (torch._scaled_mm 8192³) is measured in the same run.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/fp8_prefill_experiment.py --out $OUT
Prints one line per cell and appends it to fp8-prefill-experiment.jsonl under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch
import triton

import moekit
from moekit.bench.ceilings import _fp8_TFLOPs
from moekit.bench.fp8 import quantised_reference, quantize_experts
from moekit.bench.inputs import make_tokens, make_weights, reference_rows, rel_err
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.experts_fp8 import _fit_k, _k_groups, default_fp8_config
from moekit.quant import QuantScheme
from moekit.tuning import ExpertsConfig, GemmConfig

CELLS = [("qwen3-30b-a3b", (4096, 16384)), ("mixtral-8x7b", (4096,)),
         ("deepseek-v3", (4096,)), ("olmoe-1b-7b", (4096,)), ("gpt-oss-120b", (4096,)),
         ("deepseek-v2-lite", (4096,))]
SCHEMES = ("fp8_tensor", "fp8_channel", "fp8_block")


def candidates(scheme: QuantScheme) -> dict[str, ExpertsConfig]:
    """Label → configuration, K tiles cut to the scheme's groups."""
    k1, k2, _ = _k_groups(scheme)

    def cfg(block_m, g1, g2, tail):
        return ExpertsConfig(block_m, _fit_k(GemmConfig(*g1), k1), _fit_k(GemmConfig(*g2), k2),
                             tail_block_m=tail)
    return {
        "64 rows (v4 tiles)": cfg(64, (128, 128, 8, 8, 4), (256, 128, 8, 8, 3), 0),
        "128 rows + tails": cfg(128, (128, 128, 8, 8, 3), (128, 128, 8, 8, 4), 64),
        "128 rows, no tails": cfg(128, (128, 128, 8, 8, 3), (128, 128, 8, 8, 4), 0),
        "128 + tails, g1 4 stages": cfg(128, (128, 128, 8, 8, 4), (128, 128, 8, 8, 4), 64),
        "128 + tails, g2 3 stages": cfg(128, (128, 128, 8, 8, 3), (128, 128, 8, 8, 3), 64),
        # K tiles of 256 where no scale groups K: GEMM1 promotes every 256, not every 128.
        "128 + tails, g1 k256": cfg(128, (128, 256, 8, 8, 3), (128, 128, 8, 8, 4), 64),
        "128 + tails, g1 k256 s2": cfg(128, (128, 256, 8, 8, 2), (128, 128, 8, 8, 4), 64),
        "64 rows, g1 k256": cfg(64, (128, 256, 8, 8, 3), (256, 128, 8, 8, 3), 0),
    }


def time_cell(name, preset, weights, scheme_name, m, peak, only=None) -> dict:
    scheme = QuantScheme.parse(scheme_name)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
    rows = reference_rows(m, 256)
    ref = quantised_reference(hidden, weights, topk, scheme_name, preset.activation, rows)
    flops = 2 * m * preset.top_k * 3 * preset.hidden * preset.inter  # gated: 2I + I rows
    if preset.activation == "relu2":
        flops = flops * 2 // 3

    def run(config):
        return moekit.fused_experts_fp8(hidden, weights.w13, weights.w2, topk.ids, topk.weights,
                                        scheme=scheme, activation=preset.activation,
                                        b13=weights.b13, b2=weights.b2, config=config)
    default = default_fp8_config(m, preset.num_experts, preset.top_k, preset.hidden,
                                 preset.inter, scheme)
    configs = {"heuristic": default, **{k: c for k, c in candidates(scheme).items()
                                         if only is None or k in only}}
    row = {"preset": name, "scheme": scheme_name, "M": m, "fp8_peak_TFLOPs": round(peak, 1)}
    for label, config in configs.items():
        try:
            us = graph_replay_us(lambda c=config: run(c))
            err = rel_err(run(config), ref, rows)
        except Exception as exc:  # a tile the scheme or the GPU rules out
            row[label] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
            continue
        row[label] = {"us": round(us, 1), "pct_peak": round(100 * flops / us / 1e6 / peak, 1),
                      "rel_err": float(f"{err:.3g}"), "config": dataclasses.asdict(config)}
    timed = [k for k in configs if "us" in row[k]]
    print(f"{name} {scheme_name} M={m}: " + ", ".join(
        f"{k} {row[k]['us']} µs ({row[k]['pct_peak']}%, err {row[k]['rel_err']})" for k in timed),
        flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    parser.add_argument("--presets", nargs="+", default=[name for name, _ in CELLS])
    parser.add_argument("--only", nargs="+", default=None,
                        help="time only these candidate labels (and the heuristic)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    peak = _fp8_TFLOPs(8192)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "git": os.environ.get("MOEKIT_GIT_COMMIT", "?"),
            "command": "bench/scripts/fp8_prefill_experiment.py", "fp8_peak_TFLOPs": peak}
    path = os.path.join(args.out, "fp8-prefill-experiment.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(meta) + "\n")
    for name, tokens in CELLS:
        if name not in args.presets:
            continue
        preset = PRESETS[name]
        bf16 = make_weights(preset, torch.bfloat16, torch.device("cuda"))
        for scheme in args.schemes:
            weights = quantize_experts(bf16, scheme)
            for m in tokens:
                row = time_cell(name, preset, weights, scheme, m, peak, args.only)
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            del weights
        del bf16
        torch.cuda.empty_cache()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
