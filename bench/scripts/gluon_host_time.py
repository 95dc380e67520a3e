"""Host (CPU) time of an eager bf16 prefill call with the Gluon GEMMs on and off.

Session 20's kernel table had eager calls at ~760–820 µs on every small preset with the
16-bit Gluon GEMMs (granite M = 1024: 759 against 278 µs with them off), though graph
replay was faster: the Gluon launches cost host time. This times `fused_experts` at
128-row tiles on a few tokens (so the GPU never holds the CPU back), Gluon on/off, and
prints cProfile's top entries by own time for the Gluon call.

    PYTHONPATH=src python3 bench/scripts/gluon_host_time.py [--out DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

import torch

import moekit
from moekit._gluon import DISABLE_ENV
from moekit._gluon_gemm2_16bit import gluon_gemm2_16bit, use_gluon_gemm2_16bit
from moekit._tma import use_tma
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import CudaTimer
from moekit.dispatch import dispatch_plan
from moekit.experts import launch_gemm1, launch_gemm2
from moekit.tuning.heuristic import tiles_for_block_m


def host_us(fn, n=200) -> float:
    """Median over 5 blocks of the host µs per call of n back-to-back calls."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    blocks = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        blocks.append((time.perf_counter() - start) / n * 1e6)
        torch.cuda.synchronize()
    return sorted(blocks)[2]


def stage_host_us(hidden, w, topk, preset, config) -> str:
    """Host µs of each launch of one call issued to an idle GPU (synchronised before the
    call), and of the same launch issued again right after (the GPU now busy): median of
    20, Gluon on and off."""
    act = moekit.Activation.parse(preset.activation)
    tma = use_tma(hidden, w.w13, w.w2, 128)
    rows = []
    for gluon in ("1", "0"):
        os.environ[DISABLE_ENV] = gluon
        times: dict[str, list[float]] = {}
        for _ in range(25):
            torch.cuda.synchronize()
            marks = [("start", time.perf_counter())]
            plan = dispatch_plan(topk.ids, preset.num_experts, config.tail_block_m,
                                 tile_m=config.block_m, backend="triton")
            marks.append(("plan", time.perf_counter()))
            inter = launch_gemm1(hidden, w.w13, w.b13, topk.weights.view(-1), plan, act.kind,
                                 act.alpha, act.limit, False, config.as_ints()[1:6], tma)
            marks.append(("gemm1", time.perf_counter()))
            inter2 = launch_gemm1(hidden, w.w13, w.b13, topk.weights.view(-1), plan, act.kind,
                                  act.alpha, act.limit, False, config.as_ints()[1:6], tma)
            marks.append(("gemm1 again", time.perf_counter()))
            if gluon == "1" and use_gluon_gemm2_16bit(w.w2, 128, plan.num_pairs):
                gluon_gemm2_16bit(inter, w.w2, w.b2, topk.weights.view(-1), plan, 132)
                marks.append(("gemm2", time.perf_counter()))
                gluon_gemm2_16bit(inter2, w.w2, w.b2, topk.weights.view(-1), plan, 132)
            else:
                launch_gemm2(inter, w.w2, w.b2, topk.weights.view(-1), plan, True,
                             config.as_ints()[6:11], tma)
                marks.append(("gemm2", time.perf_counter()))
                launch_gemm2(inter2, w.w2, w.b2, topk.weights.view(-1), plan, True,
                             config.as_ints()[6:11], tma)
            marks.append(("gemm2 again", time.perf_counter()))
            for (_, before), (name, after) in zip(marks, marks[1:], strict=False):
                times.setdefault(name, []).append((after - before) * 1e6)
        rows.append(f"  Gluon {gluon}: " + ", ".join(
            f"{name} {sorted(v)[len(v) // 2]:.1f}" for name, v in times.items()))
    return "per launch, host µs after a sync (median of 25):\n" + "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    device = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, device)
    hidden, topk = make_tokens(preset, args.tokens, torch.bfloat16, device)
    config = tiles_for_block_m(128)
    out = torch.empty_like(hidden)

    def call():
        moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                             activation=preset.activation, b13=w.b13, b2=w.b2, config=config,
                             out=out)
    lines = [f"{args.preset}, M = {args.tokens}, 128-row tiles, host µs per eager call "
             "(back to back, no sync); one call after a sync (host µs); the bench's eager "
             "timing (L2 flushed, events: µs median, back-to-back µs)"]
    timer = CudaTimer(rep_ms=50)
    for gluon in ("1", "0", "1", "0"):
        os.environ[DISABLE_ENV] = gluon
        after_sync = []
        for _ in range(20):
            torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            after_sync.append((time.perf_counter() - start) * 1e6)
        eager = timer.eager(call)
        lines.append(f"  Gluon {gluon}: {host_us(call):8.1f} back to back, "
                     f"{sorted(after_sync)[10]:8.1f} after a sync; bench eager "
                     f"{eager.median_us:8.1f}, back-to-back {eager.back_to_back_us}")
    lines.append(stage_host_us(hidden, w, topk, preset, config))
    os.environ[DISABLE_ENV] = "1"
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        call()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    lines.append(text.getvalue())
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
    lines.append(text.getvalue())
    report = "\n".join(lines)
    print(report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gluon-host-time.txt"), "w") as f:
        f.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
