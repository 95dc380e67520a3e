"""Experiment: what the way L2 is flushed before each timed replay does to decode times.

`triton.testing.do_bench` flushes L2 by zeroing a 256 MB buffer before every repetition.
That leaves L2 full of *dirty* lines, so the timed kernel, as its reads evict them, also
pays for writing ~50 MB back to memory — at M = 1 a layer reads only 25–130 MB of
weights, so this can be a large share of its time. In a serving engine the layer before
the experts mostly reads (attention weights, the KV cache), leaving clean lines.

Per preset and token count, CUDA-graph replay of the heuristic's layer timed with CUDA
events (median of --reps) after each of: `zero` (do_bench's flush: a 256 MB memset),
`read` (a float32 sum over a 256 MB buffer: evicts everything, leaves clean lines),
`zero+read` (the memset, then the read: the dirty lines written back before the timed
region), and `none` (no flush: weights partly L2-resident). Also a plain read of the
hit experts' bytes under each flush. Prints JSON lines and appends them to
l2-flush-experiment.jsonl under --out.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/l2_flush_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import triton

import moekit
from moekit.bench.ceilings import _bandwidths
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.roofline import moe_cost


def flushes() -> dict:
    zero_buf = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
    read_buf = torch.ones(256 * 2**20 // 4, dtype=torch.float32, device="cuda")
    return {
        "zero": lambda: zero_buf.zero_(),
        "read": lambda: torch.sum(read_buf),
        "zero+read": lambda: (zero_buf.zero_(), torch.sum(read_buf)),
        "none": lambda: None,
    }


def replay_us(fn, flush, reps) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        flush()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def time_cell(preset, w, m, fl, reps, mem_GBps) -> dict:
    act = moekit.Activation.parse(preset.activation)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
    out = torch.empty_like(hidden)

    def layer():
        moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights, activation=act,
                             b13=w.b13, b2=w.b2, out=out)

    hit = int(torch.unique(topk.ids).numel())
    cost = moe_cost(m, preset.top_k, preset.hidden, preset.inter, preset.gemm1_rows, hit, 2, 2,
                    bias=preset.bias)
    row = {"preset": preset.name, "M": m, "hit": hit, "MB": cost.bytes / 1e6,
           "floor_us": cost.bytes / mem_GBps / 1e3}
    row["layer_us"] = {k: replay_us(layer, f, reps) for k, f in fl.items()}
    buf = torch.ones(int(cost.bytes) // 4, dtype=torch.float32, device="cuda")
    row["read_same_bytes_us"] = {k: replay_us(lambda: torch.sum(buf), f, reps)
                                 for k, f in fl.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--presets", nargs="+", default=["qwen3-30b-a3b", "granite-3.0-3b-a800m",
                                                          "gpt-oss-120b", "mixtral-8x7b",
                                                          "deepseek-v3"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    copy_GBps, read_GBps = _bandwidths(1 << 30, "cuda", None)
    mem_GBps = max(copy_GBps, read_GBps)
    path = os.path.join(args.out, "l2-flush-experiment.jsonl")
    fl = flushes()
    head = {"copy_GBps": copy_GBps, "read_GBps": read_GBps, "torch": torch.__version__,
            "triton": triton.__version__, "device": torch.cuda.get_device_name(),
            "git": os.environ.get("MOEKIT_GIT_COMMIT")}
    x = torch.zeros(1, device="cuda")
    head["one_launch_us"] = {k: replay_us(lambda: x.add_(1), f, args.reps) for k, f in fl.items()}
    print(json.dumps(head), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(head) + "\n")
    for name in args.presets:
        preset = PRESETS[name]
        w = make_weights(preset, torch.bfloat16, torch.device("cuda"))
        for m in args.tokens:
            row = time_cell(preset, w, m, fl, args.reps, mem_GBps)
            print(json.dumps(row), flush=True)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        del w
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
