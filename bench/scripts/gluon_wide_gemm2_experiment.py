"""Experiment: the fp8 layer with 256-column Gluon GEMM2 tiles (`wide_gemm2.py`).

Prediction (session 13): GEMM2 at the Gluon GEMM1's efficiency — qwen3 M = 4096 per-tensor
156 → ~125 µs, the layer 473 → ~445 µs (55% of the fp8 peak on an H200) — since two
128-column halves share each A stage (a third fewer bytes through shared memory per
product) and each tile's fixed costs (row factors, ramp, epilogue wait) spread over twice
the columns.

    check    the layer with `wide_gemm2.gluon_gemm2` swapped into `moekit.experts_fp8`
             against `moekit.reference.fused_experts_quantized` and against the library
             (per-tensor, per-channel, static; tail tiles on and off; biases; dropped
             pairs); relative L2, bound 1e-2 (tests/test_gluon_gemm2.py's)
    time     the layer, CUDA-graph replay (clean L2), library against wide, and each
             GEMM2's CUDA time under torch.profiler, qwen3 / mixtral at M = 1024, 4096,
             16384

    PYTHONPATH=src python3 bench/scripts/gluon_wide_gemm2_experiment.py --out $OUT
    PYTHONPATH=src python3 bench/scripts/gluon_wide_gemm2_experiment.py --compile-only
        (on a CPU: compiles the wide kernel for sm_90 through ptxas, prints resources)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os

import torch
import wide_gemm2
from gluon_grouped_gemm_experiment import (
    compile_sm90,
    dense_peak_tflops,
    profiled_kernel_us,
    record,
)

import moekit
import moekit.experts_fp8
from moekit.dispatch_plan import DispatchPlan
from moekit.quant import QuantScheme, quantize_weight
from moekit.reference import fused_experts_quantized

BOUND = 1e-2


@contextlib.contextmanager
def wide_gemm2_in_the_layer():
    """`fused_experts_fp8` with the wide GEMM2 in place of the library's."""
    library = moekit.experts_fp8.gluon_gemm2
    moekit.experts_fp8.gluon_gemm2 = wide_gemm2.gluon_gemm2
    try:
        yield
    finally:
        moekit.experts_fp8.gluon_gemm2 = library


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm()).item()


def check_case(scheme_name: str, tail: bool, M: int, E: int, k: int, H: int, I: int,
               bias: bool, seed: int) -> dict:
    """One layer call, wide against the reference and the library."""
    from moekit.experts_fp8 import plan_fp8_config

    g = torch.Generator(device="cuda").manual_seed(seed)
    static = scheme_name == "static"
    scheme = QuantScheme.fp8_tensor(dynamic=False) if static else QuantScheme.parse(scheme_name)
    hidden = torch.randn(M, H, generator=g, device="cuda").to(torch.bfloat16)
    w13 = torch.randn(E, 2 * I, H, generator=g, device="cuda") / H**0.5
    w2 = torch.randn(E, H, I, generator=g, device="cuda") / I**0.5
    s1 = hidden.abs().max().float().reshape(1) / 448 if static else None
    s2 = torch.full((1,), 4.0 / 448, device="cuda") if static else None  # some values clamp
    q13 = quantize_weight(w13, scheme.weight, input_scale=s1)
    q2 = quantize_weight(w2, scheme.weight, input_scale=s2)
    b13 = torch.randn(E, 2 * I, generator=g, device="cuda") * 0.1 if bias else None
    b2 = torch.randn(E, H, generator=g, device="cuda") * 0.1 if bias else None
    logits = torch.randn(M, E, generator=g, device="cuda")
    ids, weights = moekit.route(logits, k)
    ids[::7, -1] = -1  # dropped pairs
    config = dataclasses.replace(plan_fp8_config(4096, E, k, scheme),
                                 tail_block_m=64 if tail else 0)
    call = lambda: moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme,
                                            b13=b13, b2=b2, config=config)
    library = call()
    with wide_gemm2_in_the_layer():
        wide = call()
    expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme, b13=b13,
                                       b2=b2)
    row = {"what": "check", "scheme": scheme_name, "tail": tail, "M": M, "E": E, "k": k,
           "H": H, "I": I, "bias": bias, "finite": bool(torch.isfinite(wide).all()),
           "wide_vs_reference": rel_l2(wide, expected),
           "library_vs_reference": rel_l2(library, expected),
           "wide_vs_library": rel_l2(wide, library)}
    row["ok"] = row["finite"] and row["wide_vs_reference"] <= BOUND
    return row


def time_cell(preset, m: int, weights, scheme: str, rep_ms: float) -> dict:
    from moekit.bench.inputs import make_tokens
    from moekit.bench.timing import graph_replay_us

    hidden, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
    call = lambda: moekit.fused_experts_fp8(hidden, weights.w13, weights.w2, topk.ids,
                                            topk.weights, scheme=scheme,
                                            activation=preset.activation, b13=weights.b13,
                                            b2=weights.b2)
    row = {"what": "time", "preset": preset.name, "M": m, "scheme": scheme,
           "library_layer_us": graph_replay_us(call, rep_ms),
           "library_gemm2_us": profiled_kernel_us(call, "_gemm2_ws_kernel")}
    with wide_gemm2_in_the_layer():
        row["wide_layer_us"] = graph_replay_us(call, rep_ms)
        row["wide_gemm2_us"] = profiled_kernel_us(call, "_gemm2_ws_kernel")
    flops = 2.0 * m * preset.top_k * preset.hidden * 3 * preset.inter
    row["layer_tflops_library"] = round(flops / row["library_layer_us"] / 1e6, 1)
    row["layer_tflops_wide"] = round(flops / row["wide_layer_us"] / 1e6, 1)
    return row


def measure(args) -> None:
    from moekit.bench.fp8 import quantize_experts
    from moekit.bench.inputs import make_weights
    from moekit.bench.presets import PRESETS

    for scheme in ("fp8_tensor", "fp8_channel", "static"):
        for tail in (True, False):
            for shape in ((2048, 8, 2, 1024, 512, False), (1000, 16, 4, 768, 384, True),
                          (300, 32, 8, 512, 1408, False)):
                record(check_case(scheme, tail, *shape, seed=shape[0]), args.out,
                       "gluon-wide-gemm2-experiment.jsonl")
    peak = dense_peak_tflops(torch.float8_e4m3fn, args.rep_ms)
    for name in args.presets:
        preset = PRESETS[name]
        bf16 = make_weights(preset, torch.bfloat16, torch.device("cuda"))
        for scheme in args.schemes:
            weights = quantize_experts(bf16, scheme)
            for m in args.tokens:
                row = time_cell(preset, m, weights, scheme, args.rep_ms)
                row["fp8_dense_tflops"] = peak
                record(row, args.out, "gluon-wide-gemm2-experiment.jsonl")
            del weights
        del bf16
        torch.cuda.empty_cache()


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **options)` keeps the arguments."""

    def __init__(self, captured: dict):
        self.captured = captured

    def __getitem__(self, grid):
        return lambda *args, **options: self.captured.update(args=args, options=options)


def compile_only() -> None:
    """The wide kernel for sm_90 on a machine without a GPU: per-tensor (tail tiles),
    per-channel with biases (no tails)."""
    E, H, I, cap = 4, 1024, 512, 1024
    fp8 = torch.float8_e4m3fn
    for scheme, tail in (("tensor", True), ("channel", False)):
        plan = DispatchPlan(torch.zeros(cap, dtype=torch.int32),
                            torch.zeros(cap // 64, dtype=torch.int32),
                            torch.zeros(E + 1, dtype=torch.int32), 100, 64 if tail else 128,
                            torch.zeros(100, dtype=torch.int32),
                            torch.zeros(9, dtype=torch.int32) if tail else None)
        if scheme == "channel":
            ws, layout, uniform = torch.ones(E, H), (H, 1, 0, 1, 1), False
        else:
            ws, layout, uniform = torch.ones(E), (1, 0, 0, 1, 1), True
        captured: dict = {}
        kernel = wide_gemm2._gemm2_ws_kernel
        wide_gemm2._gemm2_ws_kernel = _Recorder(captured)
        try:
            scales = torch.ones(cap, I // 128)
            wide_gemm2.gluon_gemm2(
                torch.zeros(cap, I, dtype=fp8), scales, (scales.stride(0), 1), 128,
                torch.zeros(E, H, I, dtype=fp8), ws, layout, uniform,
                torch.zeros(E, H) if scheme == "channel" else None, torch.ones(800), plan,
                torch.bfloat16, 132)
        finally:
            wide_gemm2._gemm2_ws_kernel = kernel
        print(f"{scheme} tail={tail}: "
              f"{compile_sm90(kernel, captured['args'], captured['options'])}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rep-ms", type=float, default=50)
    parser.add_argument("--presets", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b"])
    parser.add_argument("--schemes", nargs="+", default=["fp8_tensor"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--compile-only", action="store_true")
    args = parser.parse_args()
    if args.compile_only:
        compile_only()
    else:
        measure(args)


if __name__ == "__main__":
    main()
