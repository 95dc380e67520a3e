"""Eager calls on Triton's launch path, moekit's fast launch path (`moekit._launch`) and
replayed (`moekit._replay`, on top of the fast path), on the GPU's host.

Per cell, calls run back to back in blocks of 20 (synchronised between blocks, so the
GPU never holds the host back for long), the three modes interleaved over several rounds
so that a noisy stretch of the host hits all: host µs per call (until the last call
returns) and wall µs per call (until the block's work is done: what eager use costs when
the host is the bottleneck), medians over blocks; graph-replay µs of the same call (the
GPU's own time) beside them. Outputs must be bitwise equal across the modes.

    PYTHONPATH=src python3 bench/scripts/fast_launch_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from half_tile_experiment import write_rows  # this directory
from host_breakdown import layer_call

import moekit._launch as fast_launch
import moekit._replay as replay
from moekit.bench.timing import graph_replay_us

# qwen3 and granite side by side, and the first two again at the end: the lent hosts'
# speed drifts within a run (session 28), which these pairs show.
CELLS = [("qwen3-30b-a3b", 1, "bf16"), ("granite-3.0-3b-a800m", 1, "bf16"),
         ("qwen3-30b-a3b", 1024, "bf16"), ("granite-3.0-3b-a800m", 1024, "bf16"),
         ("qwen3-30b-a3b", 64, "bf16"), ("qwen3-30b-a3b", 4096, "bf16"),
         ("mixtral-8x7b", 8, "bf16"), ("qwen3-30b-a3b", 1, "fp8_tensor"),
         ("qwen3-30b-a3b", 64, "fp8_tensor"), ("qwen3-30b-a3b", 1024, "fp8_tensor"),
         ("deepseek-v2-lite", 256, "fp8_block"), ("qwen3-30b-a3b", 1, "bf16"),
         ("granite-3.0-3b-a800m", 1024, "bf16")]
BLOCK, BLOCKS, ROUNDS = 20, 5, 3
# mode → (fast launch path, replays)
MODES = {"triton": (False, False), "fast": (True, False), "replay": (True, True)}


def set_mode(mode: str) -> None:
    fast_launch.enabled, replay.enabled = MODES[mode]


def blocks(call) -> list[tuple[float, float]]:
    """(host, wall) µs per call of BLOCKS blocks of BLOCK calls."""
    torch.cuda.synchronize()
    out = []
    for _ in range(BLOCKS):
        start = time.perf_counter()
        for _ in range(BLOCK):
            call()
        issued = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
        out.append(((issued - start) / BLOCK * 1e6, (done - start) / BLOCK * 1e6))
    return out


def run_cell(name: str, m: int, dtype: str) -> dict:
    call, out = layer_call(name, m, dtype)
    results, outputs = {mode: [] for mode in MODES}, {}
    for mode in MODES:  # warm-up: compiles, and the first (recording) calls
        set_mode(mode)
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        outputs[mode] = out.clone()
    for _ in range(ROUNDS):
        for mode in MODES:
            set_mode(mode)
            results[mode] += blocks(call)
    set_mode("replay")
    row = {"preset": name, "M": m, "dtype": dtype,
           "bitwise_equal": all(torch.equal(outputs["triton"].view(torch.int16),
                                            outputs[mode].view(torch.int16)) for mode in MODES),
           "graph_us": round(graph_replay_us(call, rep_ms=20), 1)}
    for mode in MODES:
        row[f"{mode}_host_us"] = round(statistics.median(h for h, _ in results[mode]), 1)
        row[f"{mode}_wall_us"] = round(statistics.median(w for _, w in results[mode]), 1)
    row["host_saved"] = round(row["triton_host_us"] / row["fast_host_us"], 3)
    row["wall_ratio"] = round(row["triton_wall_us"] / row["fast_wall_us"], 3)
    row["replay_host_saved"] = round(row["fast_host_us"] / row["replay_host_us"], 3)
    row["replay_wall_ratio"] = round(row["fast_wall_us"] / row["replay_wall_us"], 3)
    row["hits"] = {f.fn.__name__: (f.hits, f.misses, f.fallbacks)
                   for f in fast_launch._LAUNCHERS.values() if f.hits or f.fallbacks}
    for f in fast_launch._LAUNCHERS.values():
        f.hits = f.misses = f.fallbacks = 0
    return row


def write_markdown(out_dir: str, stem: str, rows: list) -> None:
    import datetime

    import triton
    lines = [f"# Eager calls: Triton's launch path, moekit's fast path, replayed — "
             f"{torch.cuda.get_device_name(0)}, {datetime.date.today().isoformat()}", "",
             f"- command: `{' '.join(sys.argv)}` (code {os.environ.get('MOEKIT_GIT_COMMIT', '?')})",
             f"- torch {torch.__version__}, triton {triton.__version__}",
             f"- µs per call, medians of {BLOCKS * ROUNDS} blocks of {BLOCK} back-to-back "
             f"eager calls, modes interleaved; host = until the last call returns, wall = "
             f"until the GPU is done; graph = CUDA-graph replay (the GPU's own time, L2 "
             f"flushed); host ratios = Triton's ÷ fast, fast ÷ replayed", "",
             "| preset | M | dtype | graph | host Triton | host fast | host replayed | "
             "host ratios | wall Triton | wall fast | wall replayed | wall ratios | bitwise |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['M']} | {r['dtype']} | {r['graph_us']} | "
                     f"{r['triton_host_us']} | {r['fast_host_us']} | {r['replay_host_us']} | "
                     f"{r['host_saved']}, {r['replay_host_saved']} | {r['triton_wall_us']} | "
                     f"{r['fast_wall_us']} | {r['replay_wall_us']} | {r['wall_ratio']}, "
                     f"{r['replay_wall_ratio']} | {r['bitwise_equal']} |")
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--stem", default="fast-launch-experiment")
    args = parser.parse_args()
    if fast_launch.unavailable() is not None:
        sys.exit(f"fast path unavailable: {fast_launch.unavailable()}")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name, m, dtype in CELLS:
        row = run_cell(name, m, dtype)
        rows.append(row)
        print(row, flush=True)
        torch.cuda.empty_cache()
    write_rows(args.out, args.stem, rows)
    write_markdown(args.out, args.stem, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
