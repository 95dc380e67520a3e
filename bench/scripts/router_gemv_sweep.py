"""`_router_gemv_kernel`'s launch shape per router: experts a program, columns a step,
warps and pipeline stages, against cuBLAS (`F.linear`), the GPU's time in CUDA-graph
replay (L2 flushed), per token count (the kernel's ROWS: 4 up to 4 tokens, then 8 and 16).

Session 33: at two experts a program and 1024-column steps the kernel beat cuBLAS up to
H = 4096 and lost at deepseek-v3's H = 7168 (7 steps, ~1.2 µs each: a chain of dependent
loads). This sweep asks which launch shape (if any) removes the loss; its answer (H in
one step where it fits) is `moekit.routing.logits.gemv_shape`.

    PYTHONPATH=src python3 bench/scripts/router_gemv_sweep.py --out $OUT \
        [--experts 1 2 --steps 2048 4096 8192 --warps 4 8 16 --stages 1 3]
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

from moekit._intmath import cdiv
from moekit.bench.experiment_files import experiment_meta, write_experiment
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.routing._logits_kernel import _router_gemv_kernel
from moekit.routing.logits import gemv_rows

PRESET_NAMES = ["qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3", "granite-3.0-3b-a800m"]


def launch(hidden, weight, out, block_e, block_h, warps, stages):
    m, h = hidden.shape
    e = weight.shape[0]
    _router_gemv_kernel[(cdiv(e, block_e),)](
        hidden, weight, out, m, e, h, hidden.stride(0), weight.stride(0), ROWS=gemv_rows(m),
        BLOCK_E=block_e, BLOCK_H=block_h, num_warps=warps, num_stages=stages)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--stem", default="router-gemv-sweep")
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 2, 4],
                        help="experts a program")
    parser.add_argument("--steps", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
                        help="columns a step")
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    shapes = list(itertools.product(args.experts, args.steps, args.warps, args.stages))
    rows = []
    for name, m in itertools.product(PRESET_NAMES, args.tokens):
        preset = PRESETS[name]
        weight = torch.randn(preset.num_experts, preset.hidden, device="cuda",
                             dtype=torch.bfloat16) / preset.hidden**0.5
        hidden = torch.randn(m, preset.hidden, device="cuda", dtype=torch.bfloat16)
        expected = F.linear(hidden.float(), weight.float()).bfloat16()
        cublas = graph_replay_us(lambda h=hidden, w=weight: F.linear(h, w), rep_ms=20)
        for shape in shapes:
            out = torch.full((m, preset.num_experts), float("nan"), device="cuda",
                             dtype=torch.bfloat16)
            try:
                launch(hidden, weight, out, *shape)
                us = graph_replay_us(
                    lambda h=hidden, w=weight, o=out, s=shape: launch(h, w, o, *s), rep_ms=20)
            except Exception as exc:  # a shape Triton cannot build: recorded, not fatal
                rows.append({"preset": name, "M": m, "shape": shape, "error": str(exc)[:120]})
                continue
            err = float((out.float() - expected.float()).abs().max())
            rows.append({"preset": name, "M": m, "shape": shape, "kernel_us": round(us, 2),
                         "cublas_us": round(cublas, 2), "ratio": round(cublas / us, 3),
                         "max_abs_err": err})
        best = max((r for r in rows if r["preset"] == name and r["M"] == m and "ratio" in r),
                   key=lambda r: r["ratio"])
        print(name, m, "cuBLAS", round(cublas, 2), "best", best["shape"], best["kernel_us"],
              flush=True)
    notes = ["- CUDA-graph replay µs, median, L2 flushed; bf16; shape = (experts a program, "
             "columns a step, warps, stages); ratio = cuBLAS ÷ kernel"]
    table = ["| preset | M | shape | kernel | cuBLAS | ratio | max abs err |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            table.append(f"| {r['preset']} | {r['M']} | {r['shape']} | error: {r['error']} "
                         "| | | |")
        else:
            table.append(f"| {r['preset']} | {r['M']} | {r['shape']} | {r['kernel_us']} | "
                         f"{r['cublas_us']} | {r['ratio']} | {r['max_abs_err']:.2e} |")
    write_experiment(args.out, args.stem, experiment_meta(), rows,
                     "`_router_gemv_kernel` launch shapes against cuBLAS", notes, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
