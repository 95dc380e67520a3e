"""Experiment: what a tail tile costs the Gluon GEMMs — mixtral bf16 with and without tail
tiles on routings that give every expert the same rows.

Session 53 measured mixtral-8x7b bf16 at M = 2048–3072 1.07–1.14× faster without tail
tiles, both Gluon GEMMs 8–15% faster, though the tail plan has the same tiles per expert
(4–5) and only 4 of 36 are tails (bench/NOTES.md). Exactly even routing separates the
candidate causes: at 512 rows an expert neither plan has a tail or padding, so any gap
there is the TAIL_M kernels themselves; at 544 and 576 every expert ends in a 32- or
64-row tail (one tail tile against one mostly-padding 128-row tile), so the gap over
512's is what a tail tile costs. The bench's random routing at M = 2048 and 3072 is the
cell as the table sees it. `fused_experts` with the heuristic's tiles and
`tail_block_m` 64 or 0 (explicit configs: no tuned table consulted), CUDA-graph replay,
rounds interleaved.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/tail_cost_experiment.py --out $OUT

`--even` / `--tokens` choose the routings, `--dtype fp8_tensor` times `fused_experts_fp8`
at its own tiles, and `--tile-grids` adds both plans with the Gluon GEMMs launched one
program per tile (`device_check.sh` stages tailcost, tailsweep, tailgrids; session 54).

`--profile` instead calls each plan once per profiled routing between
cudaProfilerStart/Stop, after warm-up calls, for Nsight Compute's counters of the GEMMs
(`ncu --profile-from-start off`): per routing, the tail plan's kernels, then the plain
plan's, in the order `PROFILED` lists the routings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
from unittest import mock

import torch

import moekit
from moekit._gluon import TILE_PROGRAMS_ENV
from moekit._tma import heuristic_sms
from moekit.bench.experiment_files import experiment_meta, rows_table, write_experiment
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.dispatch import dispatch_plan
from moekit.experts_fp8 import default_fp8_config
from moekit.tuning.heuristic import default_config

PRESET = "mixtral-8x7b"
EVEN_ROWS = (512, 544, 576, 640)  # rows per expert under the even routing
RANDOM_TOKENS = (2048, 3072)
# Profiled: tails of full 64 rows, the bench's M = 2048 (12% slower with tails) and 4096
# (a tie, session 53), as (even rows an expert, or None and the bench's M).
PROFILED = ((576, None), (None, 2048), (None, 4096))


def even_ids(rows_per_expert: int, top_k: int, num_experts: int, device) -> torch.Tensor:
    """Pair (m, j) → (m·k + j) mod E over rows·E/k tokens: distinct experts within a
    token, exactly `rows_per_expert` pairs an expert."""
    pairs = rows_per_expert * num_experts
    if pairs % top_k:
        raise ValueError(f"{rows_per_expert} rows × {num_experts} experts is not a whole "
                         f"number of tokens of {top_k} pairs")
    ids = torch.arange(pairs, device=device, dtype=torch.int32) % num_experts
    return ids.reshape(pairs // top_k, top_k)


def tile_counts(ids: torch.Tensor, num_experts: int) -> tuple[int, int]:
    """(row tiles, of which tails) of the tail plan: 64-row blocks, 128-row tiles."""
    plan = dispatch_plan(ids, num_experts, 64, tile_m=128)
    used = int(plan.tiles[-1].item())
    return used, int((plan.tiles[:used] & 1).sum().item())


def cells(device, even_rows=EVEN_ROWS, tokens=RANDOM_TOKENS) -> list[tuple[str, torch.Tensor]]:
    """(label, routing ids): the even routings, then the bench's random ones."""
    preset = PRESETS[PRESET]
    out = [(f"even, {rows} rows an expert",
            even_ids(rows, preset.top_k, preset.num_experts, device)) for rows in even_rows]
    for m in tokens:
        out.append((f"random (bench), M = {m}",
                    make_tokens(preset, m, torch.bfloat16, device)[1].ids))
    return out


def layers(ids: torch.Tensor, w, dtype: str) -> dict:
    """{"tail", "none"}: one layer call each over routing `ids`, the default tiles of
    `dtype` ("bf16", or an fp8 scheme with `w` quantised to it) with tail_block_m 64 or 0."""
    preset = PRESETS[PRESET]
    m = ids.shape[0]
    hidden, topk = make_tokens(preset, m, torch.bfloat16, ids.device)
    shape = (m, preset.num_experts, preset.top_k, preset.hidden, preset.inter)
    sms = heuristic_sms(ids.device)
    if dtype == "bf16":
        base = default_config(*shape, 2, sms)
    else:
        base = default_fp8_config(*shape, dtype, sms)
    if base.block_m != 128:
        raise ValueError(f"M = {m}: {base.block_m}-row tiles, which take no tail tiles")

    def layer(tail_block_m):
        config = dataclasses.replace(base, tail_block_m=tail_block_m)
        if dtype == "bf16":
            return lambda: moekit.fused_experts(hidden, w.w13, w.w2, ids, topk.weights,
                                                activation=preset.activation, config=config)
        return lambda: moekit.fused_experts_fp8(hidden, w.w13, w.w2, ids, topk.weights,
                                                scheme=dtype, activation=preset.activation,
                                                config=config)
    return {"tail": layer(64), "none": layer(0)}


def one_program_per_tile(call):
    """`call` with the Gluon GEMMs launched one program per tile (`TILE_PROGRAMS_ENV` = 1,
    read at launch: a graph captures that grid), not persistent."""
    def run():
        with mock.patch.dict(os.environ, {TILE_PROGRAMS_ENV: "1"}):
            return call()
    return run


def measure(label: str, ids: torch.Tensor, w, dtype: str, rounds: int, rep_ms: float,
            tile_grids: bool = False) -> dict:
    """One routing's row: the layer with tail tiles and without (`tile_grids`: also both
    with one program per tile), rounds interleaved; times as ÷ "none"'s."""
    preset = PRESETS[PRESET]
    m = ids.shape[0]
    calls = layers(ids, w, dtype)
    if tile_grids:
        calls.update({f"{name}, tile grid": one_program_per_tile(call)
                      for name, call in list(calls.items())})
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(graph_replay_us(call, rep_ms))
    outputs = {name: call() for name, call in calls.items()}
    tiles, tails = tile_counts(ids, preset.num_experts)
    median = {name: statistics.median(t) for name, t in times.items()}
    row = {"routing": label, "M": m, "row tiles": tiles, "tails": tails}
    for name in calls:
        row[f"{name} µs"] = round(median[name], 1)
    for name in calls:
        if name != "none":
            row[f"{name} ÷ none"] = round(median[name] / median["none"], 3)
    row["outputs equal"] = all(torch.equal(out, outputs["none"]) for out in outputs.values())
    row.update({f"rounds {name}": [round(t, 1) for t in times[name]] for name in calls})
    return row


def profile(w, device, dtype: str, routings=PROFILED) -> None:
    """One call of each plan per routing (`PROFILED`'s form) between
    cudaProfilerStart/Stop."""
    preset = PRESETS[PRESET]
    for rows, m in routings:
        if rows is None:
            ids = make_tokens(preset, m, torch.bfloat16, device)[1].ids
        else:
            ids = even_ids(rows, preset.top_k, preset.num_experts, device)
        tiles, tails = tile_counts(ids, preset.num_experts)
        for name, call in layers(ids, w, dtype).items():
            for _ in range(2):  # compiles
                call()
            torch.cuda.synchronize()
            print(f"== {name}: M = {ids.shape[0]}, {rows or 'random'} rows an expert, "
                  f"{tiles} row tiles, {tails} tails", flush=True)
            torch.cuda.cudart().cudaProfilerStart()
            call()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--stem", default="tail-cost-experiment",
                        help="result files' name, before the dtype")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rep-ms", type=float, default=30)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp8_tensor"),
                        help="the layer's weights (fp8: fused_experts_fp8 and its tiles)")
    parser.add_argument("--even", type=int, nargs="*", default=list(EVEN_ROWS),
                        metavar="ROWS", help="even routings, rows an expert")
    parser.add_argument("--tokens", type=int, nargs="*", default=list(RANDOM_TOKENS),
                        metavar="M", help="the bench's random routings, tokens")
    parser.add_argument("--tile-grids", action="store_true",
                        help="also both plans with the Gluon GEMMs one program per tile")
    parser.add_argument("--profile", action="store_true",
                        help="one call per plan and PROFILED routing, for Nsight Compute")
    parser.add_argument("--profile-tokens", type=int, nargs="*", metavar="M",
                        help="with --profile: the bench's random routings at these M instead")
    args = parser.parse_args()
    device = torch.device("cuda")
    w = make_weights(PRESETS[PRESET], torch.bfloat16, device)
    if args.dtype != "bf16":
        w = quantize_experts(w, args.dtype)
    if args.profile:
        chosen = [(None, m) for m in args.profile_tokens] if args.profile_tokens else PROFILED
        profile(w, device, args.dtype, chosen)
        return
    rows = []
    for label, ids in cells(device, args.even, args.tokens):
        rows.append(measure(label, ids, w, args.dtype, args.rounds, args.rep_ms,
                            args.tile_grids))
        print(rows[-1], flush=True)
    table = rows_table(rows, [k for k in rows[0] if not k.startswith("rounds")])
    write_experiment(
        args.out, f"{args.stem}-{args.dtype}", experiment_meta(), rows,
        f"Tail tiles against none, {PRESET} {args.dtype}, even and random routings",
        [f"- the default tiles with tail_block_m 64 or 0, CUDA-graph replay, L2 emptied "
         f"before each replay; median of {args.rounds} interleaved rounds (each round's "
         "times in the JSON)",
         "- 'tails': the tail plan's 64-row tail tiles; the plan without tails has as many "
         "row tiles, its last per expert 128 rows high",
         "- ', tile grid': the Gluon GEMMs launched one program per tile "
         f"({TILE_PROGRAMS_ENV}=1), not persistent"],
        table)


if __name__ == "__main__":
    main()
