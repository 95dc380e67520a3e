"""Where an eager call's host time goes, on the GPU's own host.

Eager prefill is host-bound on the lent hosts at small and mid M (the bf16 table's eager
column: granite M = 1024 759 µs against 116 in graph replay on one host, ~310 on
another; bench/NOTES.md, session 20), and cProfile's own overhead hid where. This wraps
a few functions with wall-clock timers (each wrapper adds ~0.3 µs) and splits a call's
host µs into: Triton's launcher (`CudaLauncher.__call__`: argument packing, TMA
descriptor encoding, the driver's launch), the rest of `JITFunction.run` (binder, cache
key, globals check, launch metadata) — or, for launches moekit's fast path
(`moekit._launch`, session 28) makes, the rest of `FastLauncher.run` (its key and
checks) —, moekit's `descriptor()`, and everything else (moekit's Python, torch
allocations and views). `MOEKIT_FAST_LAUNCH=0` times Triton's path alone, as before
session 28. Replayed calls (`moekit._replay`, session 29) skip most of what this splits,
so replays are off here (`fast_launch_experiment.py` times them). Calls run back to back
in blocks of 20,
synchronised between blocks, so the GPU never holds the host back for long; the median
block's per-call figures are printed.

    PYTHONPATH=src python3 bench/scripts/host_breakdown.py --out $OUT
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from half_tile_experiment import write_rows  # this directory
from triton.backends.nvidia.driver import CudaLauncher
from triton.runtime.jit import JITFunction

import moekit
import moekit._gluon
import moekit._gluon_gemm1
import moekit._gluon_gemm1_16bit
import moekit._gluon_gemm2
import moekit._gluon_gemm2_16bit
import moekit._replay
from moekit._launch import FastLauncher
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS

CELLS = [("qwen3-30b-a3b", 1, "bf16"), ("qwen3-30b-a3b", 1, "fp8_tensor"),
         ("granite-3.0-3b-a800m", 1024, "bf16"), ("qwen3-30b-a3b", 1024, "bf16"),
         ("qwen3-30b-a3b", 1024, "fp8_tensor"), ("qwen3-30b-a3b", 64, "bf16")]
BLOCK, BLOCKS = 20, 7

_spent = {"launcher": 0.0, "jit_run": 0.0, "descriptor": 0.0}
_count = {"launches": 0}


def _timed(key, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _spent[key] += time.perf_counter() - start
    return wrapper


def _install() -> None:
    run = JITFunction.run
    timed_run, timed_fast = _timed("jit_run", run), _timed("jit_run", FastLauncher.run)
    _inside_fast = [False]  # a fast path's miss calls JITFunction.run: count it once

    def jit_run(self, *args, **kwargs):
        if _inside_fast[0]:
            return run(self, *args, **kwargs)
        _count["launches"] += 1
        return timed_run(self, *args, **kwargs)

    def fast(self, *args, **kwargs):
        _count["launches"] += 1
        _inside_fast[0] = True
        try:
            return timed_fast(self, *args, **kwargs)
        finally:
            _inside_fast[0] = False
    JITFunction.run = jit_run
    FastLauncher.run = fast
    CudaLauncher.__call__ = _timed("launcher", CudaLauncher.__call__)
    moekit._gluon.descriptor = _timed("descriptor", moekit._gluon.descriptor)
    for module in list(sys.modules.values()):  # modules that imported `descriptor` by name
        if getattr(module, "__name__", "").startswith("moekit.") and \
                getattr(module, "descriptor", None) is not None and module is not moekit._gluon:
            module.descriptor = moekit._gluon.descriptor


def layer_call(name: str, m: int, dtype: str):
    """(an eager call of the layer at this cell, its output buffer)."""
    device = torch.device("cuda")
    preset = PRESETS[name]
    w = make_weights(preset, torch.bfloat16, device)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, device)
    out = torch.empty_like(hidden)
    if dtype == "bf16":
        return lambda: moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                            activation=preset.activation, b13=w.b13, b2=w.b2,
                                            out=out), out
    q = quantize_experts(w, dtype)
    return lambda: moekit.fused_experts_fp8(hidden, q.w13, q.w2, topk.ids, topk.weights,
                                            scheme=dtype, activation=preset.activation,
                                            b13=q.b13, b2=q.b2, out=out), out


def measure(call) -> dict:
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    blocks = []
    for _ in range(BLOCKS):
        for key in _spent:
            _spent[key] = 0.0
        _count["launches"] = 0
        start = time.perf_counter()
        for _ in range(BLOCK):
            call()
        total = time.perf_counter() - start
        torch.cuda.synchronize()
        per = {k: v / BLOCK * 1e6 for k, v in _spent.items()}
        per["total"] = total / BLOCK * 1e6
        per["launches"] = _count["launches"] / BLOCK
        blocks.append(per)
    mid = sorted(blocks, key=lambda b: b["total"])[BLOCKS // 2]
    mid["binder_etc"] = mid["jit_run"] - mid["launcher"]
    mid["rest"] = mid["total"] - mid["jit_run"] - mid["descriptor"]
    mid["total_spread"] = [round(b["total"], 1) for b in blocks]
    return mid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    moekit._replay.enabled = False
    _install()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name, m, dtype in CELLS:
        per = measure(layer_call(name, m, dtype)[0])
        per.update(preset=name, M=m, dtype=dtype)
        rows.append(per)
        print(f"{name} M={m} {dtype}: {per['total']:.1f} µs host per call, "
              f"{per['launches']:.0f} launches: launcher {per['launcher']:.1f}, rest of "
              f"JITFunction.run {per['binder_etc']:.1f}, descriptor() {per['descriptor']:.1f}, "
              f"everything else {per['rest']:.1f} (block totals {per['total_spread']})",
              flush=True)
        torch.cuda.empty_cache()
    write_rows(args.out, "host-breakdown", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
