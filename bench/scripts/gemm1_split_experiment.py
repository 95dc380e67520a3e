"""Experiment: the direct path's GEMM1 split over K, at decode.

Session 9 measured the direct GEMM1 streaming ~2 TB/s at M = 1 (192 programs of 16 K
steps each at qwen3). This times, per preset and token count (CUDA-graph replay, L2
flushed):
- floors: a graph of one tiny launch, of two; `torch.sum` over a buffer the size of the
  hit experts' w13 bytes (what a plain read of those bytes costs, ramp-up included);
- GEMM1 alone at the library's direct kernel over a few tiles;
- GEMM1 split over K (prototype kernels here): SPLIT programs per (pair, column tile),
  each writing its float32 gate/up sums; either (B) the last of them to arrive (a
  counter per pair and column tile, reset to 0 by that program, so the buffer stays
  zero between launches) adds the parts in order, then bias and activation, and writes
  `inter` for the library's GEMM2; or (A) no counters: GEMM2 (a prototype here) adds
  the parts, bias and activation as it loads each K tile of its input;
- the layer: library heuristic, (B) + library GEMM2, (A) + prologue GEMM2; relative error
  against the float32 reference, and the best (B) layer run twice (bitwise equal?).
Each cell is printed and appended to gemm1-split-experiment.jsonl under --out.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/gemm1_split_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

import moekit
import moekit._replay
from moekit import reference
from moekit._direct_kernels import (
    ROWS,
    _first_row,
    _gate_up_cols,
    _part_slots,
    _sum_parts,
    _weight_cols,
)
from moekit._experts_kernels import _bias_and_activate
from moekit.bench.ceilings import _bandwidths
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.roofline import moe_cost
from moekit.bench.timing import graph_replay_us
from moekit.experts_direct import (
    gemm2_arrivals,
    gemm2_parts,
    launch_direct_gemm1,
    launch_direct_gemm2,
)
from moekit.tuning.heuristic import direct_tiles

moekit._replay.enabled = False  # this script patches what the ops read: no replays

GEMM1_TILES = [(32, 128, 4, 5), (16, 128, 4, 6), (16, 256, 4, 4), (64, 128, 4, 4),
               (32, 128, 4, 8), (32, 64, 4, 8)]
SPLIT_TILES = [(32, 128, 4, 4), (64, 128, 4, 4), (16, 128, 4, 4), (32, 128, 4, 2)]
SPLITS = [2, 4, 8]


@triton.jit
def _gemm1_split_kernel(hidden_ptr, w13_ptr, b13_ptr, topk_ids_ptr, inter_ptr, parts_ptr,
                        counts_ptr, num_experts, H, I, N1, top_k, stride_hm, stride_we,
                        stride_wn, stride_be, stride_im, alpha, limit,
                        ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                        EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, SPLIT: tl.constexpr,
                        SPLIT_STEPS: tl.constexpr, FINISH: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pair = tl.program_id(0) // SPLIT
    split = tl.program_id(0) % SPLIT
    pid_n = tl.program_id(1)
    expert = tl.load(topk_ids_ptr + pair)
    if (expert < 0) | (expert >= num_experts):
        return
    token = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    k_begin = split * SPLIT_STEPS * BLOCK_K
    k_end = tl.minimum(H, k_begin + SPLIT_STEPS * BLOCK_K)
    x_ptr = hidden_ptr + token * stride_hm
    g_ptrs, u_ptrs = _gate_up_cols(w13_ptr, expert, offs_n, offs_k, I, stride_we, stride_wn)
    g_ptrs += k_begin
    u_ptrs += k_begin
    gate = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        x = _first_row(x_ptr + k0, k0, offs_k, H, True, EVEN_K)
        g = _weight_cols(g_ptrs, k0, col_ok, offs_k, H, True, EVEN_K, EVEN_N, False)
        gate = tl.dot(x, g, gate)
        if GATED:
            u = _weight_cols(u_ptrs, k0, col_ok, offs_k, H, True, EVEN_K, EVEN_N, False)
            up = tl.dot(x, u, up)
            u_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
    rows = tl.arange(0, ROWS)[:, None]
    first = (rows == 0) & col_ok[None, :]
    part_row = parts_ptr + (pair * SPLIT + split).to(tl.int64) * N1 + rows * 0 + offs_n[None, :]
    tl.store(part_row, gate, mask=first)
    if GATED:
        tl.store(part_row + I, up, mask=first)
    if FINISH:
        tl.debug_barrier()
        counter = counts_ptr + pair * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(counter, 1)
        if arrived == SPLIT - 1:
            base = parts_ptr + (pair * SPLIT).to(tl.int64) * N1 + offs_n
            g_sum = tl.load(base, mask=col_ok, other=0.0, cache_modifier=".cg")
            u_sum = tl.load(base + I, mask=col_ok & GATED, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT):
                g_sum += tl.load(base + s * N1, mask=col_ok, other=0.0, cache_modifier=".cg")
                if GATED:
                    u_sum += tl.load(base + s * N1 + I, mask=col_ok, other=0.0,
                                     cache_modifier=".cg")
            result = _bias_and_activate(g_sum[None, :], u_sum[None, :], b13_ptr, expert, offs_n,
                                        col_ok, I, stride_be, alpha, limit, ACTIVATION, GATED,
                                        HAS_BIAS)
            tl.store(inter_ptr + pair.to(tl.int64) * stride_im + offs_n[None, :],
                     result.to(inter_ptr.dtype.element_ty), mask=col_ok[None, :])
            tl.store(counter, 0)


@triton.jit
def _gemm2_prologue_kernel(parts_ptr, b13_ptr, w2_ptr, b2_ptr, topk_ids_ptr, topk_weights_ptr,
                           out_ptr, partials_ptr, arrivals_ptr, num_experts, H, I, N1,
                           stride_we, stride_wn, stride_be, stride_b1e, stride_om, alpha, limit,
                           ACTIVATION: tl.constexpr, GATED: tl.constexpr,
                           HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                           SPLIT: tl.constexpr, TOP_K: tl.constexpr, SLOTS: tl.constexpr,
                           PER_PART: tl.constexpr, PARTS: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    token = tl.program_id(0) // PARTS
    part = tl.program_id(0) - token * PARTS
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    k_steps = tl.cdiv(I, BLOCK_K)
    cols = offs_n[None, :] * stride_wn + offs_k[:, None]
    slots, slot_ok, slot_ids, first = _part_slots(topk_ids_ptr, token, part, num_experts,
                                                  TOP_K, SLOTS, PER_PART)
    slot_scales = tl.load(topk_weights_ptr + token * TOP_K + slots, mask=slot_ok, other=0.0)
    rows = tl.arange(0, ROWS)[:, None]
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for step in range(0, PER_PART * k_steps):
        slot = first + step // k_steps
        k0 = (step - (slot - first) * k_steps) * BLOCK_K
        this = slots == slot
        expert = tl.sum(tl.where(this & slot_ok, slot_ids, 0))
        valid = tl.sum(tl.where(this & slot_ok, 1, 0)) > 0
        pair = token * TOP_K + slot
        mask = valid & (offs_k + k0 < I)
        base = parts_ptr + (pair * SPLIT).to(tl.int64) * N1 + k0 + offs_k
        gate = tl.load(base, mask=mask, other=0.0)
        up = tl.load(base + I, mask=mask & GATED, other=0.0)
        for s in tl.static_range(1, SPLIT):
            gate += tl.load(base + s * N1, mask=mask, other=0.0)
            if GATED:
                up += tl.load(base + s * N1 + I, mask=mask, other=0.0)
        act = _bias_and_activate(gate[None, :], up[None, :], b13_ptr, expert, k0 + offs_k,
                                 offs_k + k0 < I, I, stride_b1e, alpha, limit, ACTIVATION,
                                 GATED, HAS_BIAS)
        a = tl.where(rows == 0, act, 0.0)
        b_ptrs = w2_ptr + expert.to(tl.int64) * stride_we + k0 + cols
        b = _weight_cols(b_ptrs, k0, col_ok, offs_k, I, valid, EVEN_K, EVEN_N, True)
        acc += tl.dot(a.to(w2_ptr.dtype.element_ty), b) * tl.sum(tl.where(this, slot_scales, 0.0))
    if HAS_BIAS:
        for j in tl.static_range(PER_PART):
            this = slots == first + j
            expert = tl.sum(tl.where(this & slot_ok, slot_ids, 0))
            valid = tl.sum(tl.where(this & slot_ok, 1, 0)) > 0
            bias = tl.load(b2_ptr + expert.to(tl.int64) * stride_be + offs_n,
                           mask=col_ok & valid, other=0.0).to(tl.float32)
            acc += (bias * tl.sum(tl.where(this, slot_scales, 0.0)))[None, :]
    _sum_parts(acc, out_ptr, partials_ptr, arrivals_ptr, token, part, pid_n, offs_n, col_ok,
               H, stride_om, PARTS)


class Split:
    """Buffers and launches of the split GEMM1 (and the prologue GEMM2) for one cell."""

    def __init__(self, hidden, w, topk, act):
        self.hidden, self.w, self.topk, self.act = hidden, w, topk, act
        m, self.H = hidden.shape
        self.k = topk.ids.shape[1]
        self.gated = act.kind != "relu2"
        self.N1 = w.w13.shape[1]
        self.I = self.N1 // 2 if self.gated else self.N1
        self.inter = torch.empty((m * self.k, self.I), dtype=hidden.dtype, device=hidden.device)
        self.parts = torch.empty((m * self.k * 8, self.N1), dtype=torch.float32,
                                 device=hidden.device)
        self.counts = torch.zeros(m * self.k * 256, dtype=torch.int32, device=hidden.device)

    def gemm1(self, split, tile, finish):
        bn, bk, warps, stages = tile
        steps = triton.cdiv(triton.cdiv(self.H, bk), split)
        w13, b13 = self.w.w13, self.w.b13
        _gemm1_split_kernel[(self.inter.shape[0] * split, triton.cdiv(self.I, bn))](
            self.hidden, w13, w13 if b13 is None else b13, self.topk.ids, self.inter, self.parts,
            self.counts, w13.shape[0], self.H, self.I, self.N1, self.k, self.hidden.stride(0),
            w13.stride(0), w13.stride(1), 0 if b13 is None else b13.stride(0),
            self.inter.stride(0), float(self.act.alpha), float(self.act.limit),
            ACTIVATION=self.act.kind, GATED=self.gated, HAS_BIAS=b13 is not None,
            EVEN_K=self.H % bk == 0, EVEN_N=self.I % bn == 0, SPLIT=split, SPLIT_STEPS=steps,
            FINISH=finish, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)

    def gemm2_prologue(self, split, tiles, out, arrivals):
        bn, bk, per, warps, stages = tiles
        w2, b2, b13 = self.w.w2, self.w.b2, self.w.b13
        per_part, parts, partials = gemm2_parts(self.k, per, out)
        _gemm2_prologue_kernel[(out.shape[0] * parts, triton.cdiv(self.H, bn))](
            self.parts, w2 if b13 is None else b13, w2, w2 if b2 is None else b2,
            self.topk.ids, self.topk.weights, out, partials,
            self.topk.ids if arrivals is None else arrivals, w2.shape[0], self.H, self.I,
            self.N1, w2.stride(0), w2.stride(1), 0 if b2 is None else b2.stride(0),
            0 if b13 is None else b13.stride(0), out.stride(0), float(self.act.alpha),
            float(self.act.limit), ACTIVATION=self.act.kind, GATED=self.gated,
            HAS_BIAS=b2 is not None, EVEN_K=self.I % bk == 0, EVEN_N=self.H % bn == 0,
            SPLIT=split, TOP_K=self.k, SLOTS=triton.next_power_of_2(self.k), PER_PART=per_part,
            PARTS=parts, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


def floors(rep_ms) -> dict:
    x = torch.zeros(1, device="cuda")
    one = graph_replay_us(lambda: x.add_(1), rep_ms)
    two = graph_replay_us(lambda: (x.add_(1), x.add_(1)), rep_ms)
    return {"one_launch_us": one, "two_launches_us": two}


def read_us(nbytes, rep_ms) -> float:
    buf = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    return graph_replay_us(lambda: torch.sum(buf), rep_ms)


def time_cell(preset, w, m, rep_ms, read_GBps) -> dict:
    hidden, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
    act = moekit.Activation.parse(preset.activation)
    out = torch.empty_like(hidden)
    heuristic = direct_tiles(m, preset.top_k, preset.hidden)
    g2 = heuristic.as_ints()[6:11]
    hit = int(torch.unique(topk.ids).numel())
    w13_bytes = hit * w.w13.shape[1] * w.w13.shape[2] * 2
    row = {"preset": preset.name, "M": m, "hit": hit, "w13_MB": w13_bytes / 1e6,
           "read_w13_bytes_us": read_us(w13_bytes, rep_ms),
           "w13_floor_us": w13_bytes / read_GBps / 1e3}

    def lib_gemm1(tile):
        bn, bk, warps, stages = tile
        return lambda: launch_direct_gemm1(hidden, w.w13, w.b13, topk.ids, topk.weights,
                                           act.kind, act.alpha, act.limit, False,
                                           (bn, bk, 1, warps, stages))

    row["gemm1_lib"] = {str(t): graph_replay_us(lib_gemm1(t), rep_ms) for t in GEMM1_TILES}
    s = Split(hidden, w, topk, act)
    row["gemm1_split_finish"] = {}
    row["gemm1_split_parts"] = {}
    for split in SPLITS:
        for tile in SPLIT_TILES:
            row["gemm1_split_finish"][str((split, *tile))] = graph_replay_us(
                lambda split=split, tile=tile: s.gemm1(split, tile, True), rep_ms)
        row["gemm1_split_parts"][str((split, SPLIT_TILES[0]))] = graph_replay_us(
            lambda split=split: s.gemm1(split, SPLIT_TILES[0], False), rep_ms)

    f32 = lambda t: None if t is None else t.float()
    ref = reference.fused_experts(hidden.float(), w.w13.float(), w.w2.float(), topk.ids,
                                  topk.weights, activation=act, b13=f32(w.b13), b2=f32(w.b2))
    err = lambda o: ((o.float() - ref).norm() / ref.norm()).item()

    def lib_layer():
        moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights, activation=act,
                             b13=w.b13, b2=w.b2, config=heuristic, out=out)

    row["layer_heuristic_us"] = graph_replay_us(lib_layer, rep_ms)
    row["err_heuristic"] = err(out)
    best_b = min(row["gemm1_split_finish"], key=row["gemm1_split_finish"].get)
    split_b, *tile_b = eval(best_b)

    def layer_b(split, tile):
        def run():
            arrivals = gemm2_arrivals(topk.ids, w.w2.shape[1], g2)
            if arrivals is not None:
                arrivals.zero_()
            s.gemm1(split, tile, True)
            launch_direct_gemm2(s.inter, w.w2, w.b2, topk.ids, topk.weights, True, g2, out,
                                arrivals)
        return run

    row["layer_b"] = {}
    for split in SPLITS:
        tile = tuple(tile_b) if split == split_b else SPLIT_TILES[0]
        row["layer_b"][str((split, *tile))] = graph_replay_us(layer_b(split, tile), rep_ms)
        row[f"err_b_{split}"] = err(out)
    best = min(row["layer_b"], key=row["layer_b"].get)
    split, *tile = eval(best)
    layer_b(split, tuple(tile))()
    first = out.clone()
    layer_b(split, tuple(tile))()
    row["b_deterministic"] = bool(torch.equal(first, out))

    def layer_a(split):
        def run():
            arrivals = gemm2_arrivals(topk.ids, w.w2.shape[1], g2)
            if arrivals is not None:
                arrivals.zero_()
            s.gemm1(split, SPLIT_TILES[0], False)
            s.gemm2_prologue(split, g2, out, arrivals)
        return run

    row["layer_a"] = {}
    for split in SPLITS:
        try:
            row["layer_a"][str(split)] = graph_replay_us(layer_a(split), rep_ms)
            row[f"err_a_{split}"] = err(out)
        except Exception as exc:  # an experiment: note it and go on
            row["layer_a"][str(split)] = str(exc)[:200]
    cost = moe_cost(m, preset.top_k, preset.hidden, preset.inter, preset.gemm1_rows, hit, 2, 2,
                    bias=preset.bias)
    row["floor_us"] = cost.bytes / read_GBps / 1e3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--presets", nargs="+", default=["qwen3-30b-a3b", "granite-3.0-3b-a800m",
                                                          "gpt-oss-120b", "deepseek-v2-lite"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--rep-ms", type=float, default=40)
    args = parser.parse_args()
    _, read_GBps = _bandwidths(1 << 28, "cuda", None)
    path = os.path.join(args.out, "gemm1-split-experiment.jsonl")
    head = {"read_GBps": read_GBps, "torch": torch.__version__, "triton": triton.__version__,
            "device": torch.cuda.get_device_name(), **floors(args.rep_ms)}
    print(json.dumps(head), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(head) + "\n")
    for name in args.presets:
        preset = PRESETS[name]
        w = make_weights(preset, torch.bfloat16, torch.device("cuda"))
        for m in args.tokens:
            row = time_cell(preset, w, m, args.rep_ms, read_GBps)
            print(json.dumps(row), flush=True)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        del w
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
