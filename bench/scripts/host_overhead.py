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


if __name__ == "__main__":
    main()
