"""Experiment: the 16-bit Gluon GEMM2's persistent programs claiming their tiles from a
counter (`moekit._dynamic_tiles`, `MOEKIT_GLUON_DYNAMIC_TILES=1`) against taking every
num_programs-th tile — the bf16 layer, CUDA-graph replay, rounds interleaved.

Session 54 found mixtral's tail tiles put the persistent programs out of step, so that
they read 28–41% more DRAM (bench/NOTES.md). Claimed tiles keep the tiles in flight a
contiguous window. Cells: mixtral with tails forced on (where they cost 6–12%) and as the
heuristic runs it (no tails from M = 2048), deepseek-v3 (w2 29 MB an expert, GEMM2 grouped),
and qwen3 / olmoe / granite, whose GEMM2 tiles are short (K = 512–1024: 8–16 K steps), for
the claim's own cost (one atomic a tile). The GEMM1 is the same both ways.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/claimed_tiles_experiment.py --out $OUT
`--profile` calls each variant once per cell between cudaProfilerStart/Stop (for
`ncu --profile-from-start off -k regex:gemm2`), in the table's order.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

import torch

import moekit
from moekit._dynamic_tiles import DYNAMIC_TILES_ENV
from moekit._tma import heuristic_sms
from moekit.bench.experiment_files import experiment_meta, write_experiment
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.tuning.heuristic import default_config

# (preset, M, tails: True forced on, None the heuristic's)
CELLS = (("mixtral-8x7b", 2048, True), ("mixtral-8x7b", 2048, None),
         ("mixtral-8x7b", 8192, True), ("mixtral-8x7b", 8192, None),
         ("deepseek-v3", 16384, None),
         ("qwen3-30b-a3b", 4096, None), ("olmoe-1b-7b", 4096, None),
         ("granite-3.0-3b-a800m", 4096, None))


def with_claims(call, claimed: bool):
    """`call` with `DYNAMIC_TILES_ENV` set for its launches (a graph captures the kernel)."""
    def run():
        before = os.environ.get(DYNAMIC_TILES_ENV)
        os.environ[DYNAMIC_TILES_ENV] = "1" if claimed else "0"
        try:
            return call()
        finally:
            if before is None:
                del os.environ[DYNAMIC_TILES_ENV]
            else:
                os.environ[DYNAMIC_TILES_ENV] = before
    return run


def layer(name: str, m: int, tails, weights: dict):
    """The bf16 layer at the heuristic's tiles (`tails` True: tail tiles forced on)."""
    preset = PRESETS[name]
    device = torch.device("cuda")
    if name not in weights:
        weights.clear()  # one preset's weights at a time (deepseek-v3: 22.5 GB in bf16)
        torch.cuda.empty_cache()
        weights[name] = make_weights(preset, torch.bfloat16, device)
    w = weights[name]
    hidden, topk = make_tokens(preset, m, torch.bfloat16, device)
    config = default_config(m, preset.num_experts, preset.top_k, preset.hidden, preset.inter,
                            2, heuristic_sms(device))
    if tails:
        config = dataclasses.replace(config, tail_block_m=64)
    return config, lambda: moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                                activation=preset.activation, b13=w.b13,
                                                b2=w.b2, config=config)


def measure(name: str, m: int, tails, weights: dict, rounds: int, rep_ms: float) -> dict:
    config, call = layer(name, m, tails, weights)
    calls = {"static": with_claims(call, False), "claimed": with_claims(call, True)}
    times = {variant: [] for variant in calls}
    for _ in range(rounds):
        for variant, run in calls.items():
            times[variant].append(graph_replay_us(run, rep_ms))
    outputs = {variant: run() for variant, run in calls.items()}
    static, claimed = (statistics.median(times[v]) for v in ("static", "claimed"))
    return {"preset": name, "M": m, "tails": "on (forced)" if tails else (
                "on" if config.tail_block_m else "off"),
            "static µs": round(static, 1), "claimed µs": round(claimed, 1),
            "static ÷ claimed": round(static / claimed, 3),
            "outputs equal": bool(torch.equal(outputs["static"], outputs["claimed"])),
            "rounds static": [round(t, 1) for t in times["static"]],
            "rounds claimed": [round(t, 1) for t in times["claimed"]]}


def profile(cells, weights: dict) -> None:
    for name, m, tails in cells:
        _, call = layer(name, m, tails, weights)
        for claimed in (False, True):
            run = with_claims(call, claimed)
            for _ in range(2):  # compiles
                run()
            torch.cuda.synchronize()
            print(f"== {name} M = {m} tails {tails} claimed {claimed}", flush=True)
            torch.cuda.cudart().cudaProfilerStart()
            run()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rep-ms", type=float, default=30)
    parser.add_argument("--cells", type=int, nargs="*", help="indices into CELLS (default all)")
    parser.add_argument("--profile", action="store_true",
                        help="one call per variant and cell, for Nsight Compute")
    args = parser.parse_args()
    cells = CELLS if args.cells is None else [CELLS[i] for i in args.cells]
    weights: dict = {}
    if args.profile:
        profile(cells, weights)
        return
    rows = []
    for name, m, tails in cells:
        rows.append(measure(name, m, tails, weights, args.rounds, args.rep_ms))
        print(rows[-1], flush=True)
    keys = [k for k in rows[0] if not k.startswith("rounds")]
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    write_experiment(
        args.out, "claimed-tiles-experiment", experiment_meta(), rows,
        "The 16-bit Gluon GEMM2's programs claiming their tiles against every "
        "num_programs-th, bf16 layer",
        [f"- {DYNAMIC_TILES_ENV}=1 against 0 (the GEMM2 only; GEMM1 the same), the "
         "heuristic's tiles (tails forced on where marked), CUDA-graph replay, L2 emptied "
         f"before each replay; median of {args.rounds} interleaved rounds (each in the JSON)"],
        table)


if __name__ == "__main__":
    main()
