"""Where the fp8 direct GEMMs' time goes at a few tokens: first loads, steps or epilogue?

Session 68 found the direct path's launches cost little (qwen3 M = 1: the second GEMM's
launch adds nothing beyond its kernel, the quantiser's ~1.3 µs) while GEMM2 takes ~8.9 µs
for a 3.9 µs floor; neither more programs, nor w2 prefetched into L2, nor wider tiles
closed it (bench/NOTES.md). This splits each GEMM's time, each launch alone in a CUDA
graph behind the same two counter memsets (GEMM1's groups, GEMM2's arrivals), L2
read-flushed unless warm:

    memset        the two memsets alone: a replay's fixed cost
    full          the GEMM at the shipped direct config
    one_step      the same with K cut to one K tile (views of the operands): the chain of
                  first loads and the epilogue, with one step between
    small_warm    full, with the small inputs (ids, router weights, the GEMM's input rows
                  and their scales) read back into L2 after the flush: only the weights
                  cold, as in a serving engine where the router and attention have just
                  written them
    one_step_small_warm
    warm          full with L2 not flushed (a sleep kernel instead, so replays stay queued)
    whole_token   GEMM2 only: one program a token (no partial sums, fewer programs)
    cols128…      GEMM1 only: 128 columns a program, a group of GEMM2's input whole in one
                  program (no float32 scratch, arrival or last-program read)
    static…       GEMM1 only, same tiles: GEMM2's input quantised by a static scale, so
                  each program stores its own fp8 columns (no float32 scratch, arrival or
                  last-program group read): the 1×g groups' hand-off is static − full
    free_parts…   GEMM2 only, same tiles and programs: each part of a token's slots made a
                  token of its own (ids, router weights and input rows re-laid on the
                  host), so each program stores its sum (no float32 partial, arrival or
                  last-program ordered sum): the parts' hand-off is free_parts − full
    probe_ids     the GEMM's grid, each program reading its expert id, then its first
                  weight tile (gate and up for GEMM1), and storing one float per row: a
                  launch's bare chain of id → weight → store
    probe_no_ids  the same with the expert taken from the program id: the id's round trip
                  is probe_ids − probe_no_ids

so per step ≈ (full − one_step) / (steps − 1), the chain ≈ one_step − memset, and DRAM's
share ≈ full − warm; each hand-off and the id's round trip are the differences named
above (rows of their own in the output).

    PYTHONPATH=src python3 bench/scripts/direct_chain_experiment.py --out $OUT \\
        [--cells qwen3-30b-a3b:1 gpt-oss-120b:1 granite-3.0-3b-a800m:1] [--schemes fp8_tensor]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
import triton
import triton.language as tl

import moekit._replay
from moekit._intmath import cdiv
from moekit.bench.experiment_files import experiment_meta, rows_table, write_experiment
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.l2_flush import shared_flush
from moekit.bench.presets import get_preset
from moekit.bench.timing import graph_replay_us
from moekit.experts_direct import gemm2_arrivals, slot_parts
from moekit.experts_direct_fp8 import (
    gemm1_group_counts,
    launch_direct_gemm1_fp8,
    launch_direct_gemm2_fp8,
)
from moekit.experts_fp8 import _gemm1_input, _groups_to_list, direct_fp8_config
from moekit.quant import QuantizedWeight, QuantScheme

moekit._replay.enabled = False  # launches are called directly here
STEM = "fp8-direct-chain-experiment"
CELLS = ["qwen3-30b-a3b:1", "gpt-oss-120b:1", "granite-3.0-3b-a800m:1", "qwen3-30b-a3b:4"]


def first_k(w: QuantizedWeight, k: int, group_k: int | None) -> QuantizedWeight:
    """A view of `w` [E, N, K] cut to its first k columns (its K-group scales likewise)."""
    scale = w.scale
    if group_k and scale.dim() == 3 and scale.shape[2] > 1:
        scale = scale[:, :, : cdiv(k, group_k)]
    return dataclasses.replace(w, q=w.q[:, :, :k], scale=scale)


@triton.jit
def _first_tile_probe(ids_ptr, w_ptr, out_ptr, num_experts, N, second_rows, stride_we,
                      stride_wn, ids_step, num_ids, READ_ID: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: its expert's first [BLOCK_N, BLOCK_K] weight tile (and the tile
    `second_rows` further down: GEMM1's up rows), summed per row and stored — a launch's
    chain of id load → weight load → store, with nothing else in it."""
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    if READ_ID:
        expert = tl.load(ids_ptr + tl.minimum(p * ids_step, num_ids - 1)).to(tl.int64)
    else:
        expert = (p % num_experts).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ptrs = w_ptr + expert * stride_we + rows[:, None] * stride_wn + tl.arange(0, BLOCK_K)[None, :]
    ok = (rows < N)[:, None]
    tile = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    tile += tl.load(ptrs + second_rows * stride_wn, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + p * N + rows, tl.sum(tile, axis=1), mask=rows < N)


def probe_launch(ids, w, programs, n, second_rows, ids_step, block_n, block_k, read_id):
    """`_first_tile_probe` over (programs, n / block_n)."""
    out = torch.empty((programs, n), dtype=torch.float32, device=w.device)

    def run():
        _first_tile_probe[(programs, cdiv(n, block_n))](
            ids, w, out, w.shape[0], n, second_rows, w.stride(0), w.stride(1), ids_step,
            ids.numel(), READ_ID=read_id, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return run


def parts_as_tokens(ids, weights, inter_q, inter_scale, per_part):
    """Each part of a token's slots as a token of its own: (ids, router weights) [M·parts,
    per_part] and GEMM2's input rows and scales in that order (a short last part padded
    with id −1, its rows never read)."""
    m, k = ids.shape
    parts = cdiv(k, per_part)
    pad = parts * per_part - k
    slot = torch.arange(parts * per_part, device=ids.device).clamp(max=k - 1)
    rows = (torch.arange(m, device=ids.device)[:, None] * k + slot[None, :]).reshape(-1)
    fake_ids = ids[:, slot].clone()
    if pad:
        fake_ids[:, k:] = -1
    scale = inter_scale if inter_scale.dim() < 2 else inter_scale[rows].contiguous()
    return (fake_ids.reshape(m * parts, per_part), weights[:, slot].reshape(m * parts, per_part),
            inter_q[rows].contiguous(), scale)


def gemm_launches(preset, m: int, scheme_name: str, dev: str = "cuda",
                  dtype: torch.dtype = torch.bfloat16):
    """{(gemm, variant): (launch, warm)} for one cell, and the shipped config."""
    dev = torch.device(dev)
    scheme = QuantScheme.parse(scheme_name)
    w = quantize_experts(make_weights(preset, dtype, dev), scheme_name)
    hidden, topk = make_tokens(preset, m, dtype, dev)
    config = direct_fp8_config(m, preset.top_k, preset.hidden, preset.inter, scheme)
    tiles = config.as_ints()
    groups = _groups_to_list(scheme)
    act = moekit.Activation.parse(preset.activation)
    counts = gemm1_group_counts(topk.ids, preset.inter, groups[4], False, tiles[1])
    x = _gemm1_input(hidden, groups[2], groups[3], None, clear=counts)
    arrivals = gemm2_arrivals(topk.ids, preset.hidden, tiles[6:11])
    w_group_k = None if groups[1] <= 0 else groups[1]

    def memset():
        for t in (counts, arrivals):
            if t is not None:
                t.zero_()

    def gemm1(k=None, block_n=None, static=None):
        k1 = k or preset.hidden
        g1 = list(tiles[1:6])
        if block_n is not None:
            g1[0] = block_n
        w13 = first_k(w.w13, k1, w_group_k)
        x_scale = x.scale
        if k and groups[3] > 0 and x.scale.dim() == 2:  # 1×g groups of hidden
            x_scale = x.scale[:, : cdiv(k1, groups[3])]

        def run():
            memset()
            return launch_direct_gemm1_fp8(
                x.x[:, :k1], x_scale, x.stride_sm, w13.q, w13.scale, w.b13, topk.ids,
                preset.inter, act.kind, act.alpha, act.limit, groups, static, g1, counts,
                arrivals)
        return run

    inter_q, inter_scale = gemm1()()
    out = torch.empty_like(hidden)

    def gemm2(k=None, per=None, free_parts=False):
        k2 = k or preset.inter
        w2 = first_k(w.w2, k2, w_group_k)
        ids, weights, rows, i_scale, dest = topk.ids, topk.weights, inter_q, inter_scale, out
        g2 = list(tiles[6:11])
        if free_parts:  # every part a token: one part a program, as many programs
            per_part = slot_parts(preset.top_k, g2[2])[0]
            ids, weights, rows, i_scale = parts_as_tokens(ids, weights, rows, i_scale,
                                                          per_part)
            dest = torch.empty((ids.shape[0], preset.hidden), dtype=out.dtype,
                               device=out.device)
        if k and groups[4] > 0 and i_scale.dim() == 2:  # 1×g groups of GEMM2's input
            i_scale = i_scale[:, : cdiv(k2, groups[4])]
        if per is not None:
            g2[2] = per
        # The counters all variants zero (`memset`): GEMM2's are [M, H-tiles] whenever a
        # token's slots are split, whatever the split.
        arr = arrivals if slot_parts(ids.shape[1], g2[2])[1] > 1 else None

        def run():
            memset()
            launch_direct_gemm2_fp8(rows[:, :k2], i_scale, False, w2.q, w2.scale, w.b2,
                                    ids, weights, groups, g2, dest, arr)
        return run

    flush = shared_flush("read") if dev.type == "cuda" else (lambda: None)
    small = {"gemm1": [topk.ids, topk.weights, x.x, x.scale],
             "gemm2": [topk.ids, topk.weights, inter_q, inter_scale]}

    def small_warm(gemm):
        def before():
            flush()
            for t in small[gemm]:
                t.view(torch.uint8).max()  # read back into L2
        return before

    def sleep():
        torch.cuda._sleep(100_000)  # ~50 µs: the next replay is queued before it starts

    launches = {("both", "memset"): (memset, flush)}
    for name, make, k in (("gemm1", gemm1, tiles[2]), ("gemm2", gemm2, tiles[7])):
        launches[(name, "full")] = (make(), flush)
        launches[(name, "one_step")] = (make(k), flush)
        launches[(name, "small_warm")] = (make(), small_warm(name))
        launches[(name, "one_step_small_warm")] = (make(k), small_warm(name))
        launches[(name, "warm")] = (make(), sleep)
    launches[("gemm2", "whole_token")] = (gemm2(per=preset.top_k), flush)
    # GEMM1 with 128 columns a program: a 1×128 group of GEMM2's input whole in one
    # program, so no float32 scratch, arrival or last-program read (a quarter the programs).
    launches[("gemm1", "cols128")] = (gemm1(block_n=128), flush)
    launches[("gemm1", "cols128_one_step")] = (gemm1(tiles[2], 128), flush)
    launches[("gemm1", "cols128_warm")] = (gemm1(block_n=128), sleep)
    # Each hand-off dropped at the same tiles: GEMM1's groups (a static scale), GEMM2's
    # ordered sum of parts (each part a token).
    static = torch.ones(1, dtype=torch.float32, device=dev)
    launches[("gemm1", "static")] = (gemm1(static=static), flush)
    launches[("gemm1", "static_one_step")] = (gemm1(tiles[2], static=static), flush)
    launches[("gemm1", "static_warm")] = (gemm1(static=static), sleep)
    launches[("gemm2", "free_parts")] = (gemm2(free_parts=True), flush)
    launches[("gemm2", "free_parts_one_step")] = (gemm2(tiles[7], free_parts=True), flush)
    launches[("gemm2", "free_parts_warm")] = (gemm2(free_parts=True), sleep)
    # The bare chain of a launch at each GEMM's grid and first tile.
    pairs = topk.ids.numel()
    per_part, parts = slot_parts(preset.top_k, tiles[8])
    gated = act.kind != "relu2"
    probes = {"gemm1": (w.w13.q, pairs, preset.inter, preset.inter if gated else 0, 1,
                        tiles[1], tiles[2]),
              "gemm2": (w.w2.q, m * parts, preset.hidden, 0, per_part, tiles[6], tiles[7])}
    for gemm, (weight, programs, n, second, step, bn, bk) in probes.items():
        for read_id in (True, False):
            probe = probe_launch(topk.ids, weight, programs, n, second, step, bn, bk, read_id)

            def run(probe=probe):
                memset()
                probe()
            launches[(gemm, "probe_ids" if read_id else "probe_no_ids")] = (run, flush)
    return launches, config


def run_cell(name: str, m: int, scheme: str, rep_ms: float, log) -> list[dict]:
    preset = get_preset(name)
    launches, config = gemm_launches(preset, m, scheme)
    rows = []
    for (gemm, variant), (fn, before) in launches.items():
        us = graph_replay_us(fn, rep_ms, before)
        rows.append({"preset": name, "M": m, "scheme": scheme, "gemm": gemm,
                     "variant": variant, "us": round(us, 2)})
        log(" ".join(f"{k}={v}" for k, v in rows[-1].items()))
    steps = {"gemm1": cdiv(preset.hidden, config.gemm1.block_k),
             "gemm2": cdiv(preset.inter, config.gemm2.block_k)}
    us = {(r["gemm"], r["variant"]): r["us"] for r in rows}
    for gemm, n in steps.items():
        if n > 1:
            per_step = (us[(gemm, "full")] - us[(gemm, "one_step")]) / (n - 1)
            rows.append({"preset": name, "M": m, "scheme": scheme, "gemm": gemm,
                         "variant": f"per step of {n}", "us": round(per_step, 3)})
    derived = [("gemm1", "groups' hand-off (full − static)", "full", "static"),
               ("gemm1", "groups' hand-off, one step", "one_step", "static_one_step"),
               ("gemm2", "parts' hand-off (full − free_parts)", "full", "free_parts"),
               ("gemm2", "parts' hand-off, one step", "one_step", "free_parts_one_step")]
    derived += [(g, f"{what} ({a} − {b})", a, b) for g in steps
                for what, a, b in (("id's round trip", "probe_ids", "probe_no_ids"),
                                   ("bare chain", "probe_ids", "memset"))]
    for gemm, what, a, b in derived:
        a_us = us.get((gemm, a), us.get(("both", a)))
        b_us = us.get((gemm, b), us.get(("both", b)))
        rows.append({"preset": name, "M": m, "scheme": scheme, "gemm": gemm, "variant": what,
                     "us": round(a_us - b_us, 2)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--cells", nargs="+", default=CELLS, metavar="PRESET:M")
    parser.add_argument("--schemes", nargs="+", default=["fp8_tensor"])
    parser.add_argument("--rep-ms", type=float, default=30)
    args = parser.parse_args()
    meta = experiment_meta(rep_ms=args.rep_ms)
    notes = ["- each launch alone in a CUDA graph behind the same two counter memsets, "
             "median µs, L2 read-flushed before each replay; small_warm: the small "
             "inputs read back into L2 after the flush; warm: no flush, a sleep kernel "
             "before each replay instead; one_step: K cut to one K tile by views; "
             "whole_token: GEMM2 one program a token; static: GEMM1 with a static scale "
             "for GEMM2's input (no groups' hand-off); free_parts: GEMM2 with each part of "
             "a token's slots a token of its own (no ordered sum; not a valid output); "
             "probe_ids / probe_no_ids: a bare kernel at the GEMM's grid reading its expert "
             "id (or not), one weight tile and storing a row; per step = (full − one_step) "
             "/ (steps − 1)"]
    rows = []
    for text in args.cells:
        name, m = text.rsplit(":", 1)
        for scheme in args.schemes:
            rows += run_cell(name, int(m), scheme, args.rep_ms, print)
            write_experiment(args.out, STEM, meta, rows,
                             "fp8 direct GEMMs: first loads, steps, epilogue", notes,
                             rows_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
