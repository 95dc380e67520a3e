"""Experiment: decode with programmatic dependent launch (PDL) against the plain chain.

For decode cells it captures `fused_experts` in a CUDA graph twice — `moekit._pdl.ENABLED`
off and on — times both replays (L2 flushed before each, alternating A/B/A/B so drift
hits both), and checks that the outputs are bitwise equal (PDL changes when work starts,
not what it computes).

Usage (on the device): PYTHONPATH=src python3 bench/scripts/pdl_experiment.py --out $OUT
Writes pdl-experiment.json under --out and prints one line per cell.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from moekit import _pdl
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import get_preset
from moekit.experts import fused_experts

CELLS = ["qwen3-30b-a3b:1", "qwen3-30b-a3b:8", "qwen3-30b-a3b:64", "granite-3.0-3b-a800m:1",
         "granite-3.0-3b-a800m:8", "granite-3.0-3b-a800m:64", "olmoe-1b-7b:1", "olmoe-1b-7b:8",
         "deepseek-v2-lite:1", "deepseek-v2-lite:8", "gpt-oss-120b:1", "gpt-oss-120b:8",
         "mixtral-8x7b:1", "mixtral-8x7b:8", "deepseek-v3:1"]


def captured(fn):
    """A CUDA graph of `fn` (warmed up first) and the output it writes."""
    out = fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph, out


def run_cell(cell: str, rounds: int, log) -> dict:
    name, num_tokens = cell.rsplit(":", 1)
    preset, num_tokens = get_preset(name), int(num_tokens)
    dev = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, dev)
    hidden, topk = make_tokens(preset, num_tokens, torch.bfloat16, dev)
    call = lambda: fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,  # noqa: E731
                                 activation=preset.activation, b13=w.b13, b2=w.b2)
    graphs = {}
    for enabled in (False, True):
        _pdl.ENABLED = enabled
        graphs[enabled] = captured(call)
    _pdl.ENABLED = False
    times = {False: [], True: []}
    for _ in range(rounds):
        for enabled in (False, True):
            graph = graphs[enabled][0]
            times[enabled].append(do_bench(graph.replay, warmup=5, rep=40,
                                           return_mode="median") * 1e3)
    plain, pdl = statistics.median(times[False]), statistics.median(times[True])
    same = torch.equal(graphs[False][1], graphs[True][1])
    row = {"cell": cell, "plain_us": round(plain, 2), "pdl_us": round(pdl, 2),
           "speedup": round(plain / pdl, 3), "bitwise_equal": same,
           "plain_rounds": [round(t, 2) for t in times[False]],
           "pdl_rounds": [round(t, 2) for t in times[True]]}
    log(f"{cell}: plain {plain:.1f} µs, PDL {pdl:.1f} µs ({plain / pdl:.3f}×), "
        f"bitwise equal: {same}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="directory of pdl-experiment.json")
    parser.add_argument("--cells", nargs="*", default=CELLS, help="preset:M pairs")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds per cell")
    args = parser.parse_args()
    rows = []
    for cell in args.cells:
        try:
            rows.append(run_cell(cell, args.rounds, lambda s: print(s, flush=True)))
        except Exception as exc:  # an experiment: report the cell and go on
            print(f"{cell}: failed: {str(exc)[:400]}", flush=True)
        torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": triton.__version__, "command": " ".join(sys.argv)}
    Path(args.out, "pdl-experiment.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
