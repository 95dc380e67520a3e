"""Experiment: does the plan GEMM1's decode time follow its programs' spread over the SMs?

At qwen3 fp8 M = 8 the GEMM1 reads 157 MB at 2.52 TB/s (76% of the DRAM peak) while its
SMs sit idle 18% of the kernel's cycles (Nsight Compute, session 72: active 93.7k of
114k cycles on average, 88.8k–109k per SM); bf16's GEMM1 of the same cell streams at
2.91 TB/s. Each program reads one expert's 128 gate and 128 up rows over all of H
(~0.5 MB in fp8), so ~300 programs of equal size meet 132 SMs: if an SM's rate is
capped, the SM with the most programs sets the time — a staircase in the number of
experts hit, not a slope.

This times GEMM1 (and GEMM2) by themselves, per kernel under torch.profiler, on routings
that hit exactly n experts (pair p → expert p mod n: every token's k experts distinct,
≤ 16 rows an expert, so one row tile each), for n from 16 to 128 at M = 16; at the
library's tiles, at GEMM1 depths 3 and 5 (three and one programs an SM, against four
stages' two), and at 8 warps a GEMM1 or GEMM2 program (session 72: one program reads ~4
GB/s a warp, so a kernel's last few programs drain faster with more warps); and at half
the hidden size (the same programs, half the K steps — a split-K GEMM1's shape, with 2n
experts the same bytes in twice the programs).

    PYTHONPATH=src python3 bench/scripts/gemm1_waves_experiment.py --out $OUT
Writes gemm1-waves-experiment.{json,md} under --out after every preset. The files record
$MOEKIT_GEMM1_PERSISTENT (the plan GEMM1 in persistent runs of tiles,
`moekit._persistent_gemm1`: run once without and once with it) and $MOEKIT_GEMM1_K_PARTS,
which only branch `s72-gemm1-ksplit`'s GEMM1 reads (its K loop in parts; measured slower,
not merged).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

import torch
from fp8_kernel_profile import kernel_blocks_us  # this directory: per-kernel µs by block

import moekit
from moekit.bench.experiment_files import experiment_meta, rows_table, write_experiment
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_weights
from moekit.bench.presets import PRESETS
from moekit.experts import default_config
from moekit.experts_fp8 import default_fp8_config

STEM = "gemm1-waves-experiment"
TITLE = "The plan GEMM1's decode time against the experts hit"
M = 16
EXPERTS_HIT = (16, 24, 32, 40, 44, 45, 48, 56, 64, 66, 67, 80, 88, 89, 96, 112, 128)
CALLS, BLOCKS = 10, 2
# label → (GEMM1 fields, GEMM2 fields) changed from the library's tiles (fp8 only)
VARIANTS = {"tiles": ({}, {}), "g1 stages 3": ({"num_stages": 3}, {}),
            "g1 stages 5": ({"num_stages": 5}, {}), "g1 warps 8": ({"num_warps": 8}, {}),
            "g1 warps 8 stages 3": ({"num_warps": 8, "num_stages": 3}, {}),
            "g2 warps 8": ({}, {"num_warps": 8})}


def routing(n: int, device: torch.device, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [M, k] int32 hitting exactly n experts (pair p → p mod n) and equal weights."""
    pairs = torch.arange(M * top_k, device=device, dtype=torch.int32)
    ids = (pairs % n).view(M, top_k)
    return ids, torch.full((M, top_k), 1.0 / top_k, device=device)


def kernel_us(call) -> dict[str, float]:
    """{kernel name: median over BLOCKS blocks of its CUDA µs per call}."""
    return {k: statistics.median(v) for k, v in kernel_blocks_us(call, BLOCKS, CALLS).items()}


def layer_call(preset, dtype: str, weights, hidden, ids, topk_weights, config):
    """One layer call of `dtype` (bf16 or an fp8 scheme) at `config`."""
    if dtype == "bf16":
        return lambda: moekit.fused_experts(hidden, weights.w13, weights.w2, ids, topk_weights,
                                            activation=preset.activation, config=config)
    return lambda: moekit.fused_experts_fp8(hidden, weights.w13, weights.w2, ids, topk_weights,
                                            scheme=dtype, activation=preset.activation,
                                            config=config)


def gemm_us(kernels: dict[str, float], which: str) -> float:
    return sum(us for name, us in kernels.items() if which in name)


def run_preset(preset, dtypes: list[str], experts_hit, variants, log) -> list[dict]:
    device = torch.device("cuda")
    bf16 = make_weights(preset, torch.bfloat16, device)
    hidden = torch.randn(M, preset.hidden, device=device, dtype=torch.bfloat16)
    rows = []
    for dtype in dtypes:
        weights = bf16 if dtype == "bf16" else quantize_experts(bf16, dtype)
        if dtype == "bf16":
            base = default_config(M, preset.num_experts, preset.top_k, preset.hidden,
                                  preset.inter, 2)
            configs = {"tiles": base}
        else:
            base = default_fp8_config(M, preset.num_experts, preset.top_k, preset.hidden,
                                      preset.inter, dtype)
            configs = {label: dataclasses.replace(
                base, gemm1=dataclasses.replace(base.gemm1, **change1),
                gemm2=dataclasses.replace(base.gemm2, **change2))
                for label, (change1, change2) in VARIANTS.items() if label in variants}
        bytes_per_expert = preset.gemm1_rows * preset.hidden * (2 if dtype == "bf16" else 1)
        for n in experts_hit:
            ids, topk_weights = routing(n, device, preset.top_k)
            for label, config in configs.items():
                call = layer_call(preset, dtype, weights, hidden, ids, topk_weights, config)
                kernels = kernel_us(call)
                g1 = gemm_us(kernels, "gemm1")
                row = {"H": preset.hidden, "dtype": dtype, "tiles": label, "experts": n,
                       "gemm1_us": round(g1, 2), "gemm2_us": round(gemm_us(kernels, "gemm2"), 2),
                       "gemm1_TBps": round(n * bytes_per_expert / g1 / 1e6, 3),
                       "gemm1_us_per_expert": round(g1 / n, 3)}
                log(row)
                rows.append(row)
        del weights
    del bf16
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048, 1024],
                        help="hidden sizes to run the preset at (the first its own)")
    parser.add_argument("--dtypes", nargs="+", default=["fp8_tensor", "bf16"])
    parser.add_argument("--experts", type=int, nargs="+", default=list(EXPERTS_HIT))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="the fp8 tile variants to run (default all)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    top_k = PRESETS[args.preset].top_k
    if any(n < top_k or n > min(M * top_k, PRESETS[args.preset].num_experts)
           for n in args.experts):
        parser.error(f"--experts: each n must lie in [{top_k}, min(M·k, E)]")
    k_parts = os.environ.get("MOEKIT_GEMM1_K_PARTS", "1")  # the fp8 GEMM1's K parts
    persistent = os.environ.get("MOEKIT_GEMM1_PERSISTENT", "") or "off"
    meta = experiment_meta(M=M, calls=CALLS, blocks=BLOCKS, gemm1_k_parts=k_parts,
                           gemm1_persistent=persistent)
    notes = [f"- M = {M}, pair p → expert p mod n; per-kernel CUDA µs under torch.profiler, "
             f"median of {BLOCKS} blocks of {CALLS} eager calls (weights ≫ L2)",
             "- gemm1_TBps: the hit experts' w13 bytes over GEMM1's µs",
             f"- the fp8 GEMM1's K loop in {k_parts} part(s) a tile (MOEKIT_GEMM1_K_PARTS)",
             f"- GEMM1 persistent runs: {persistent} (MOEKIT_GEMM1_PERSISTENT)"]
    keys = ["H", "dtype", "tiles", "experts", "gemm1_us", "gemm2_us", "gemm1_TBps",
            "gemm1_us_per_expert"]
    rows: list[dict] = []
    for h in args.hidden:
        preset = dataclasses.replace(PRESETS[args.preset], hidden=h)
        rows += run_preset(preset, args.dtypes, args.experts, args.variants,
                           lambda r: print(r, flush=True))
        write_experiment(args.out, STEM, meta, rows, TITLE, notes, rows_table(rows, keys))
    print(f"wrote {os.path.join(args.out, STEM)}.json and .md")


if __name__ == "__main__":
    main()
