"""Eager calls of two code versions side by side on the GPU's host: the `moekit.MoE`
layer (router + `fused_moe` or `fused_moe_fp8`) and `fused_experts` / `fused_experts_fp8` alone.

For changes to the eager path (`moekit._replay`, `moekit._launch`) that leave the kernels
alone. Each version runs in its own worker process (`PYTHONPATH` = that version's src),
the versions alternating over rounds so that the host's drift (session 28: 2× between
hosts, ±15% within a run) hits both. Per cell: host µs per call (until the last call
returns) and wall µs per call (until the GPU is done), medians over blocks of
back-to-back calls as in `fast_launch_experiment.py`; the graph-replay µs of the same
call per version (the GPU's own time: a change that moves work into or out of the
replayed call can change it); and whether both versions' outputs are bitwise equal (a
digest of each worker's last output). Which version runs first alternates by round, so
a host that slows or speeds up over the run favours neither.

    PYTHONPATH=src python3 bench/scripts/eager_layer_experiment.py --out $OUT \
        --baseline-src DIR [--baseline-label TEXT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from fast_launch_experiment import BLOCK, BLOCKS, blocks  # this directory

# (kind, preset, M, dtype): "layer" is `MoE.forward`, "experts" a fused_experts(_fp8)
# call on fixed routing with `out` given (as fast_launch_experiment.py's cells).
CELLS = [("layer", "qwen3-30b-a3b", 1, "bf16"), ("experts", "qwen3-30b-a3b", 1, "bf16"),
         ("layer", "granite-3.0-3b-a800m", 1, "bf16"), ("layer", "olmoe-1b-7b", 1, "bf16"),
         ("layer", "qwen3-30b-a3b", 4, "bf16"), ("layer", "mixtral-8x7b", 8, "bf16"),
         ("layer", "qwen3-30b-a3b", 64, "bf16"), ("experts", "qwen3-30b-a3b", 64, "bf16"),
         ("experts", "qwen3-30b-a3b", 1, "fp8_tensor"), ("layer", "qwen3-30b-a3b", 1024, "bf16"),
         ("layer", "qwen3-30b-a3b", 1, "bf16"), ("layer", "qwen3-30b-a3b", 1, "fp8_block")]
ROUNDS = 4


def build(kind: str, name: str, m: int, dtype: str, seed: int):
    """(an eager call of the cell, the tensor its result lands in or is)."""
    import moekit
    from moekit.bench.presets import PRESETS

    preset = PRESETS[name]
    torch.manual_seed(seed)
    hidden = torch.randn(m, preset.hidden, device="cuda", dtype=torch.bfloat16)
    if kind == "layer":
        layer = moekit.MoE(preset.num_experts, preset.top_k, preset.hidden, preset.inter,
                           activation=preset.activation, bias=preset.bias,
                           quant=None if dtype == "bf16" else dtype, device="cuda",
                           dtype=torch.bfloat16).prepare()
        held = {}

        def call():
            with torch.no_grad():
                held["out"] = layer(hidden)
            return held["out"]
        return call
    from host_breakdown import layer_call  # this directory

    call, out = layer_call(name, m, dtype)
    return lambda: (call(), out)[1]


def worker(graph: bool, kinds: list[str]) -> None:
    """Every cell of these kinds on this process's code: one JSON line per cell."""
    from moekit.bench.timing import graph_replay_us

    for seed, (kind, name, m, dtype) in enumerate(CELLS):
        if kind not in kinds:
            continue
        call = build(kind, name, m, dtype, seed)
        for _ in range(5):  # compiles; then plain, recorded and replayed calls
            call()
        samples = blocks(call)
        out = call()
        torch.cuda.synchronize()
        row = {"cell": seed, "samples": samples,
               "digest": hashlib.sha256(out.view(torch.int16).cpu().numpy().tobytes())
               .hexdigest()[:16]}
        if graph:
            row["graph_us"] = round(graph_replay_us(call, rep_ms=20), 1)
        print(json.dumps(row), flush=True)
        del call, out
        torch.cuda.empty_cache()


def run_worker(src: str, graph: bool, kinds: str, log) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.abspath(src), os.path.dirname(os.path.abspath(__file__))]))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--kinds", kinds]
    cmd += ["--graph"] if graph else []
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    log.write(done.stderr[-4000:])
    if done.returncode != 0:
        sys.exit(f"worker on {src} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--stem", default="eager-layer-experiment")
    parser.add_argument("--baseline-src", help="the other version's src directory")
    parser.add_argument("--baseline-label", default="baseline")
    parser.add_argument("--kinds", default="layer,experts", help="which cells: layer, experts")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--graph", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.graph, args.kinds.split(","))
        return 0
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src")
    versions = {"baseline": args.baseline_src, "current": here}
    os.makedirs(args.out, exist_ok=True)
    cells = [i for i, cell in enumerate(CELLS) if cell[0] in args.kinds.split(",")]
    got = {v: {i: [] for i in cells} for v in versions}
    digests, graphs = {v: {} for v in versions}, {v: {} for v in versions}
    with open(os.path.join(args.out, f"{args.stem}.log"), "w") as log:
        for r in range(ROUNDS):
            for version, src in list(versions.items())[::1 if r % 2 == 0 else -1]:
                start = time.perf_counter()
                for row in run_worker(src, graph=r == 0, kinds=args.kinds, log=log):
                    got[version][row["cell"]] += row["samples"]
                    digests[version].setdefault(row["cell"], set()).add(row["digest"])
                    if "graph_us" in row:
                        graphs[version][row["cell"]] = row["graph_us"]
                print(f"round {r} {version}: {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for i in cells:
        kind, name, m, dtype = CELLS[i]
        row = {"kind": kind, "preset": name, "M": m, "dtype": dtype,
               "baseline_graph_us": graphs["baseline"].get(i),
               "current_graph_us": graphs["current"].get(i),
               "bitwise_equal": len(digests["baseline"][i] | digests["current"][i]) == 1}
        for v in versions:
            row[f"{v}_host_us"] = round(statistics.median(h for h, _ in got[v][i]), 1)
            row[f"{v}_wall_us"] = round(statistics.median(w for _, w in got[v][i]), 1)
        row["host_ratio"] = round(row["baseline_host_us"] / row["current_host_us"], 3)
        row["wall_ratio"] = round(row["baseline_wall_us"] / row["current_wall_us"], 3)
        rows.append(row)
        print(row, flush=True)
    write(args, rows)
    return 0


def write(args, rows: list[dict]) -> None:
    # Here, not at the top: the workers run this file against the baseline's src too.
    from moekit.bench.experiment_files import experiment_meta, write_experiment

    meta = experiment_meta(baseline=args.baseline_label, blocks=BLOCKS * ROUNDS, block=BLOCK)
    notes = [f"- µs per call, medians of {BLOCKS * ROUNDS} blocks of {BLOCK} back-to-back eager "
             f"calls, each version in its own process, versions alternating over {ROUNDS} "
             f"rounds, which one first alternating; host = until the last call returns, "
             f"wall = until the GPU is done; graph = CUDA-graph replay of the same call (the "
             f"GPU's own time, L2 flushed), in the first round; ratios = baseline "
             f"÷ current; layer = `MoE.forward` (router + `fused_moe`, `fused_moe_fp8` for "
             f"fp8), experts = `fused_experts(_fp8)` on fixed routing with `out`"]
    table = ["| call | preset | M | dtype | graph baseline | graph current | host baseline | "
             "host current | host ratio | wall baseline | wall current | wall ratio | "
             "bitwise |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['kind']} | {r['preset']} | {r['M']} | {r['dtype']} | "
                     f"{r['baseline_graph_us']} | {r['current_graph_us']} | "
                     f"{r['baseline_host_us']} | {r['current_host_us']} | "
                     f"{r['host_ratio']} | {r['baseline_wall_us']} | {r['current_wall_us']} | "
                     f"{r['wall_ratio']} | {r['bitwise_equal']} |")
    write_experiment(args.out, args.stem, meta, rows,
                     f"Eager calls, {args.baseline_label} against the current code", notes,
                     table)


if __name__ == "__main__":
    sys.exit(main())
