"""The prefill GEMMs under Nsight Compute: one layer call per cell between
cudaProfilerStart/Stop, after warm-up calls (compiles), so that `ncu --profile-from-start
off` collects exactly that call's GEMM kernels.

    ncu --profile-from-start off --clock-control none --set full \\
        -k regex:gemm -o $OUT/gemms python3 bench/scripts/ncu_gemms.py
    ncu --import $OUT/gemms.ncu-rep --page details > $OUT/gemms.txt

Per-instruction warp stalls of one kernel (SASS, sampled):

    ncu --profile-from-start off --clock-control none --section SourceCounters \\
        -k regex:_gemm1_ws_kernel -o $OUT/g1 python3 bench/scripts/ncu_gemms.py --cells 1
    ncu --import $OUT/g1.ncu-rep --page source --csv --print-source sass > $OUT/g1.csv

Cells: qwen3-30b-a3b at M = 4096 in bf16 and fp8 per-tensor (the cells furthest from
their targets), mixtral-8x7b at M = 4096 fp8 per-tensor (the same kernels nearer the
peak), for comparison of their counters; granite-3.0-3b-a800m bf16 at M = 512 (its 16-bit
GEMM1 streams w13 at 2.5–3.1 TB/s whatever the tile spread: bench/NOTES.md, session 24) and
at M = 4096 (the same kernels at 89% of the bf16 peak).
"""

from __future__ import annotations

import argparse

import torch

import moekit
import moekit._gluon_gemm2_16bit
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS

CELLS = [("qwen3-30b-a3b", 4096, "bf16"), ("qwen3-30b-a3b", 4096, "fp8_tensor"),
         ("mixtral-8x7b", 4096, "fp8_tensor"), ("granite-3.0-3b-a800m", 512, "bf16"),
         ("granite-3.0-3b-a800m", 4096, "bf16")]


def layer_call(name: str, m: int, dtype: str):
    device = torch.device("cuda")
    preset = PRESETS[name]
    w = make_weights(preset, torch.bfloat16, device)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, device)
    if dtype == "bf16":
        return lambda: moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                            activation=preset.activation, b13=w.b13, b2=w.b2)
    q = quantize_experts(w, dtype)
    return lambda: moekit.fused_experts_fp8(hidden, q.w13, q.w2, topk.ids, topk.weights,
                                            scheme=dtype, activation=preset.activation,
                                            b13=q.b13, b2=q.b2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="*", help="indices into CELLS (default all)")
    parser.add_argument("--cell", nargs="*", default=[], metavar="PRESET:M:DTYPE",
                        help="other cells, e.g. gpt-oss-120b:4096:bf16")
    parser.add_argument("--gemm2-stages", type=int, choices=(2, 3, 4),
                        help="the 16-bit Gluon GEMM2's ring depth (default the library's, 4): "
                             "how far its producer runs ahead, for the DRAM bytes it costs")
    args = parser.parse_args()
    if args.gemm2_stages:
        moekit._gluon_gemm2_16bit.STAGES = args.gemm2_stages  # read at every launch
    chosen = [] if args.cell and args.cells is None else (
        CELLS if args.cells is None else [CELLS[i] for i in args.cells])
    for cell in args.cell:
        name, m, dtype = cell.split(":")
        chosen.append((name, int(m), dtype))
    for name, m, dtype in chosen:
        call = layer_call(name, m, dtype)
        for _ in range(2):
            call()
        torch.cuda.synchronize()
        print(f"== {name} M={m} {dtype}", flush=True)
        torch.cuda.cudart().cudaProfilerStart()
        call()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        del call
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
