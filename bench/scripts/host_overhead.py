"""Host (CPU) time per eager call of the layer's pieces, to find launch overhead.

Prints µs of CPU time per call, measured over back-to-back calls without
synchronisation (the GPU work is tiny, so the CPU is the bottleneck), and the top
entries of a cProfile of the whole call. Usage: PYTHONPATH=src python THIS_FILE
"""

import cProfile
import pstats
import time

import torch

import moekit
from moekit import reference
from moekit.dispatch import dispatch_plan


def per_call_us(fn, n=300):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def main():
    E, k, H, I, M = 128, 8, 2048, 768, 32
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H**0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
    hidden = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(M, E, device="cuda")
    ids, weights = reference.route(logits, k)
    out = torch.empty_like(hidden)
    cases = {
        "torch.empty x1": lambda: torch.empty(M, H, device="cuda"),
        "route (softmax top-k)": lambda: moekit.route(logits, k),
        "dispatch_plan": lambda: dispatch_plan(ids, E, 16),
        "fused_experts": lambda: moekit.fused_experts(hidden, w13, w2, ids, weights),
        "fused_experts out=": lambda: moekit.fused_experts(hidden, w13, w2, ids, weights, out=out),
        "fused_moe": lambda: moekit.fused_moe(hidden, logits, w13, w2, k),
    }
    for name, fn in cases.items():
        print(f"{name:24s} {per_call_us(fn):8.1f} µs host per call", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        moekit.fused_experts(hidden, w13, w2, ids, weights)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    fp8_prefill(hidden, logits, k)


def fp8_prefill(hidden, logits, k):
    """fp8 at prefill tiles (128 rows, both GEMMs Gluon on an sm_90 GPU) on few tokens, so
    the host's share shows: per scheme, Gluon on and off, and a cProfile of the first."""
    import functools
    import os

    from moekit.experts_fp8 import plan_fp8_config
    from moekit.quant import QuantScheme, quantize_weight

    E, H = logits.shape[1], hidden.shape[1]
    I = 768
    ids, weights = reference.route(logits, k)
    for name in ("fp8_tensor", "fp8_block"):
        scheme = QuantScheme.parse(name)
        w13 = quantize_weight(torch.randn(E, 2 * I, H, device="cuda") / H**0.5, scheme.weight)
        w2 = quantize_weight(torch.randn(E, H, I, device="cuda") / I**0.5, scheme.weight)
        config = plan_fp8_config(4096, E, k, scheme)
        call = functools.partial(moekit.fused_experts_fp8, hidden, w13, w2, ids, weights,
                                 scheme=scheme, config=config)
        times = {"1": [], "0": []}
        for _ in range(3):  # interleaved: the host's speed drifts
            for env in times:
                os.environ["MOEKIT_GLUON"] = env
                times[env].append(per_call_us(call))
        for env, us in times.items():
            print(f"{name} 128-row tiles, MOEKIT_GLUON={env}: {min(us):8.1f} µs host per call "
                  f"(best of {', '.join(f'{u:.1f}' for u in us)})", flush=True)
        os.environ["MOEKIT_GLUON"] = "1"
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            call()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
