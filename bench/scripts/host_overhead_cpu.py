"""moekit's own host time per call, on a CPU: every kernel launch replaced by a no-op.

`host_overhead.py` measures whole eager calls on the GPU, where Triton's launch path and
the host's speed (which varied 2× between the H200 hosts of one day) blur moekit's share.
Here the launches record nothing and run nothing (as tests/test_sm90_compile.py records
them), the tensors live on the CPU and the GPU-only predicates answer as on an H100, so
what is timed is the Python and the allocations of the op itself. Large CPU allocations
cost more than the GPU's caching allocator, so prefill shapes read high; compare runs of
this script, not against GPU numbers.

`--replay` takes the fast launch path instead (its compiled kernels stand-ins whose
launch does nothing) and times each case plainly, recording and replayed
(`moekit._replay`), plus `route`.

    PYTHONPATH=src python bench/scripts/host_overhead_cpu.py [--profile NAME] [--replay]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import time
import types

import torch
from triton.runtime.jit import JITFunction

import moekit
import moekit._launch
import moekit._replay
import moekit._tma
import moekit.backend
import moekit.experts
import moekit.experts_fp8
from moekit.experts_fp8 import plan_fp8_config
from moekit.quant import QuantScheme, quantize_weight

E, K, H, I = 128, 8, 2048, 768  # qwen3-30b-a3b


def _mock_gpu(gluon: bool) -> None:
    """Launches do nothing; the ops take the Triton path on CPU tensors, with TMA, 132 SMs
    and (if `gluon`) the Gluon GEMMs, as on an H100."""
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: None
    moekit.backend.interpreter_enabled = lambda: True
    moekit._tma.device_has_tma = lambda device: True
    moekit.experts.persistent_programs = lambda device: 132
    moekit.experts_fp8.persistent_programs = lambda device: 132
    moekit.experts_fp8.use_gluon_gemm1 = (
        lambda w13, block_m, activation, input_group_k, weight_group, inter_group, has_bias:
        gluon and block_m == 128)
    moekit.experts_fp8.use_gluon_gemm2 = lambda w2, block_m, k_groups: gluon and block_m == 128


def _mock_fast_path() -> None:
    """Launches take the fast path (and so may be replayed): Triton's `run` returns a
    compiled kernel whose launch does nothing; device 0, nothing captured."""
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: types.SimpleNamespace(
        run=lambda *launch: None, function=None, packed_metadata=None)
    moekit._launch.unavailable = lambda: None
    moekit._launch._current_device = lambda: 0
    moekit._launch._current_stream = lambda device: 0
    torch.cuda.is_current_stream_capturing = lambda: False


def recording_us(fn, n: int = 200) -> float:
    """Median µs of a recording call (each after `clear()` and one plain call)."""
    times = []
    for _ in range(n):
        moekit._replay.clear()
        fn()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2] * 1e6


def per_call_us(fn, n: int = 300) -> float:
    """Best of three runs of n calls, µs per call."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def cases() -> dict:
    """name → a call of one op at one shape."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for m in (1, 64):
        hidden = torch.randn(m, H, generator=g, dtype=torch.bfloat16)
        logits = torch.randn(m, E, generator=g)
        ids, weights = moekit.route(logits, K, backend="reference")
        w13 = torch.randn(E, 2 * I, H, generator=g, dtype=torch.bfloat16)
        w2 = torch.randn(E, H, I, generator=g, dtype=torch.bfloat16)
        out[f"fused_experts bf16 M={m}"] = functools.partial(
            moekit.fused_experts, hidden, w13, w2, ids, weights, backend="triton")
        for name in ("fp8_tensor", "fp8_block"):
            scheme = QuantScheme.parse(name)
            q13 = quantize_weight(w13.float() * 0.02, scheme.weight)
            q2 = quantize_weight(w2.float() * 0.02, scheme.weight)
            out[f"fused_experts_fp8 {name} M={m}"] = functools.partial(
                moekit.fused_experts_fp8, hidden, q13, q2, ids, weights, scheme=scheme,
                backend="triton")
            if m == 64:  # prefill's 128-row tiles on few tokens (the Gluon GEMMs' path)
                out[f"fused_experts_fp8 {name} M={m} prefill tiles"] = functools.partial(
                    moekit.fused_experts_fp8, hidden, q13, q2, ids, weights, scheme=scheme,
                    config=plan_fp8_config(4096, E, K, scheme), backend="triton")
    return out


def layer_cases() -> dict:
    """name → a `moekit.MoE` forward at decode (router GEMV, route and experts in one
    replayed call), bf16 and fp8 per-tensor, gradients off as at inference."""
    out = {}
    hidden = torch.randn(1, H, dtype=torch.bfloat16)
    for quant in (None, "fp8_tensor"):
        torch.manual_seed(0)
        layer = moekit.MoE(E, K, H, I, dtype=torch.bfloat16, backend="triton", quant=quant)
        layer.w13.data.mul_(0.02)
        layer.w2.data.mul_(0.02)
        layer.requires_grad_(False)
        out[f"MoE {quant or 'bf16'} M=1"] = functools.partial(layer, hidden)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-gluon", action="store_true", help="the Triton GEMMs at prefill")
    parser.add_argument("--profile", metavar="NAME", help="cProfile one case (by name)")
    parser.add_argument("--replay", action="store_true",
                        help="the fast path: plain, recording and replayed calls")
    args = parser.parse_args()
    _mock_gpu(gluon=not args.no_gluon)
    if args.replay:
        _mock_fast_path()
    calls = cases()
    if args.replay:
        logits = torch.randn(1, E)
        calls["route M=1"] = functools.partial(moekit.route, logits, K, backend="triton")
        calls.update(layer_cases())
    for name, fn in calls.items():
        if not args.replay:
            print(f"{name:48s} {per_call_us(fn):8.1f} µs", flush=True)
            continue
        moekit._replay.enabled = False
        plain = per_call_us(fn)
        moekit._replay.enabled = True
        print(f"{name:48s} plain {plain:8.1f} µs, recording {recording_us(fn):8.1f}, "
              f"replayed {per_call_us(fn):8.1f}", flush=True)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            calls[args.profile]()
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
