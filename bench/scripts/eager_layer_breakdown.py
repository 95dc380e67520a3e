"""Where an eager `moekit.MoE` call's host time goes, on the GPU's host: the layer, each
of its parts called alone, and a replayed `fused_experts` call taken apart.

Each row is the median over 7 runs of 200 back-to-back calls of host µs per call (until
the call returns; the GPU is far from the bottleneck at M = 1). Parts called alone stay
hot in the host's caches, so their sum undercounts the layer; the cProfile table of the
layer's calls (printed, and in the log) shows the split in context.

    PYTHONPATH=src python3 bench/scripts/eager_layer_breakdown.py --out $OUT [--preset NAME]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pstats
import sys
import time

import torch

import moekit
from moekit.bench.presets import PRESETS


def host_us(call, n: int = 200, runs: int = 7) -> float:
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    per = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(n):
            call()
        per.append((time.perf_counter() - start) / n * 1e6)
        torch.cuda.synchronize()
    return round(sorted(per)[runs // 2], 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--stem", default="eager-layer-breakdown")
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    args = parser.parse_args()
    p = PRESETS[args.preset]
    torch.manual_seed(0)
    layer = moekit.MoE(p.num_experts, p.top_k, p.hidden, p.inter, activation=p.activation,
                       bias=p.bias, device="cuda", dtype=torch.bfloat16).prepare()
    w = layer._prepared
    x = torch.randn(1, p.hidden, device="cuda", dtype=torch.bfloat16)
    flat = x.reshape(-1, p.hidden)
    router = layer.router.weight.detach()
    torch.set_grad_enabled(False)
    logits = layer.router(flat)
    topk = moekit.route(logits, p.top_k)
    out = torch.empty_like(flat)
    moe_kwargs = dict(renormalize=True, activation=layer.activation, b13=w["b13"], b2=w["b2"],
                      expert_map=None, backend="auto")
    moe_args = (flat, logits, w["w13"], w["w2"], p.top_k)
    experts_args = (flat, w["w13"], w["w2"], topk.ids, topk.weights)
    experts_kwargs = dict(activation=layer.activation, b13=w["b13"], b2=w["b2"], out=out)
    calls = {
        "MoE layer (router linear + fused_moe)": lambda: layer(x),
        "layer.router(flat): the nn.Linear module": lambda: layer.router(flat),
        "F.linear(flat, router weight)": lambda: torch.nn.functional.linear(flat, router),
        "fused_moe(logits): route + experts, one replay": lambda: moekit.fused_moe(
            *moe_args, **moe_kwargs),
        "route(logits), replayed": lambda: moekit.route(logits, p.top_k),
        "fused_experts(out=...), replayed": lambda: moekit.fused_experts(
            *experts_args, **experts_kwargs),
        "fused_moe's call key": lambda: moekit.fused_moe.call_keys(moe_args, moe_kwargs),
        "torch.empty (4 KB, CUDA)": lambda: torch.empty(1, 2048, device="cuda",
                                                       dtype=torch.bfloat16),
        "torch.cuda.is_current_stream_capturing()": torch.cuda.is_current_stream_capturing,
    }
    rows = {name: host_us(call) for name, call in calls.items()}
    op = moekit.fused_experts
    key, tensors = op.call_keys(experts_args, experts_kwargs)
    replay = op.replays[key]
    rows["fused_experts replay(): allocations and launches"] = host_us(lambda: replay(tensors))
    launches, replay.launches = replay.launches, []
    rows["fused_experts replay() without its launches"] = host_us(lambda: replay(tensors))
    replay.launches = launches
    for name, us in rows.items():
        print(f"{us:8.2f} µs  {name}", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        layer(x)
    prof.disable()
    torch.cuda.synchronize()
    table = io.StringIO()
    pstats.Stats(prof, stream=table).sort_stats("tottime").print_stats(15)
    print(table.getvalue())
    write(args, rows, table.getvalue())
    return 0


def write(args, rows: dict, profile: str) -> None:
    import triton

    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.date.today().isoformat(),
            "command": " ".join(sys.argv), "code": os.environ.get("MOEKIT_GIT_COMMIT", "?"),
            "preset": args.preset, "M": 1,
            "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default")}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.stem}.json"), "w") as f:
        json.dump({"meta": meta, "host_us": rows}, f, indent=1)
    lines = [f"# Eager `MoE` layer host time, {args.preset} M = 1 — {meta['device']}, "
             f"{meta['date']}", "",
             f"- command: `{meta['command']}` (code {meta['code']}, allocator "
             f"{meta['allocator']})",
             f"- torch {meta['torch']}, triton {meta['triton']}",
             "- host µs per call, median of 7 runs of 200 back-to-back calls; parts called "
             "alone stay hot in the host's caches (their sum undercounts the layer)", "",
             "| call | host µs |", "|---|---|"]
    lines += [f"| {name} | {us} |" for name, us in rows.items()]
    lines += ["", "cProfile of 2000 layer calls (top 15 by own time):", "", "```",
              profile.strip()[:5000], "```"]
    with open(os.path.join(args.out, f"{args.stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
