"""Experiment: where prefill time goes, and whether TMA / persistent GEMMs win on Hopper.

For a few prefill cells it times each stage of `fused_experts` (plan, GEMM1, GEMM2,
combine) on its own, then times variants of the two GEMMs on the same plan and checks
their outputs against the library kernels':

    g1.ptr        the library's GEMM1 (rows gathered by pointer, weights by pointer)
    g1.tmaB       weights through a TMA descriptor, rows still gathered by pointer
    g1.tmaB.pers  the same, persistent (one program per SM looping over tiles)
    g2.ptr        the library's GEMM2
    g2.tma        inter rows and weights through TMA descriptors
    g2.tma.pers   the same, persistent

The library's kernels took the winning variants in v2 (GEMM1 weights by TMA; GEMM2 by
TMA and persistent); "ptr" now means their pointer path (W_TMA/TMA off).

Usage (on the device): PYTHONPATH=src python3 bench/scripts/tma_experiment.py --out $OUT
Writes tma-experiment.json under --out and prints one line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moekit._experts_kernels import (
    _activate,
    _combine_kernel,
    _gemm1_kernel,
    _gemm2_kernel,
    _tile_of,
)
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import get_preset
from moekit.bench.timing import graph_replay_us
from moekit.dispatch import dispatch_plan
from moekit.tuning.heuristic import default_config

CELLS = [("qwen3-30b-a3b", 4096), ("qwen3-30b-a3b", 16384), ("mixtral-8x7b", 16384),
         ("olmoe-1b-7b", 4096), ("deepseek-v2-lite", 4096), ("deepseek-v3", 16384)]

REP_MS = 60  # do_bench budget per timing


@triton.jit
def _g1_tile(hidden_ptr, w_desc, inter_ptr, sorted_pairs_ptr, block_experts_ptr, num_pairs,
             H, I, N1, top_k, stride_hm, stride_im, pid_m, pid_n,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert = tl.load(block_experts_ptr + pid_m)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + slots)
    row_ok = pairs < num_pairs
    tokens = tl.where(row_ok, pairs // top_k, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = hidden_ptr + tokens[:, None] * stride_hm + offs_k[None, :]
    row_g = expert * N1 + pid_n * BLOCK_N
    row_u = row_g + I
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        a = tl.load(a_ptrs)
        g = w_desc.load([row_g, k0])
        u = w_desc.load([row_u, k0])
        gate = tl.dot(a, g.T, gate)
        up = tl.dot(a, u.T, up)
        a_ptrs += BLOCK_K
    result = _activate(gate, up, "silu", 1.0, 1.0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = inter_ptr + slots.to(tl.int64)[:, None] * stride_im + offs_n[None, :]
    tl.store(out_ptrs, result.to(inter_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_n < I)[None, :])


@triton.jit
def _g1_tma_kernel(hidden_ptr, w_desc, inter_ptr, sorted_pairs_ptr, block_experts_ptr,
                   expert_offsets_ptr, num_experts, num_pairs, H, I, N1, top_k,
                   stride_hm, stride_im, PERSISTENT: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    used_blocks = tl.load(expert_offsets_ptr + num_experts) // BLOCK_M
    num_n = tl.cdiv(I, BLOCK_N)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), used_blocks * num_n, NUM_PROGRAMS, flatten=True):
            pid_m, pid_n = _tile_of(tile, used_blocks, num_n, GROUP_M)
            _g1_tile(hidden_ptr, w_desc, inter_ptr, sorted_pairs_ptr, block_experts_ptr,
                     num_pairs, H, I, N1, top_k, stride_hm, stride_im, pid_m, pid_n,
                     BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        tile = tl.program_id(0)
        if tile < used_blocks * num_n:
            pid_m, pid_n = _tile_of(tile, used_blocks, num_n, GROUP_M)
            _g1_tile(hidden_ptr, w_desc, inter_ptr, sorted_pairs_ptr, block_experts_ptr,
                     num_pairs, H, I, N1, top_k, stride_hm, stride_im, pid_m, pid_n,
                     BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _g2_tile(a_desc, w_desc, topk_weights_ptr, pair_out_ptr, sorted_pairs_ptr,
             block_experts_ptr, num_pairs, H, I, stride_om, pid_m, pid_n,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert = tl.load(block_experts_ptr + pid_m)
    row_w = expert * H + pid_n * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        a = a_desc.load([pid_m * BLOCK_M, k0])
        b = w_desc.load([row_w, k0])
        acc = tl.dot(a, b.T, acc)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + slots)
    row_ok = pairs < num_pairs
    w = tl.load(topk_weights_ptr + pairs, mask=row_ok, other=0.0)
    acc = acc * w[:, None]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    safe = tl.where(row_ok, pairs, 0).to(tl.int64)
    tl.store(pair_out_ptr + safe[:, None] * stride_om + offs_n[None, :],
             acc.to(pair_out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_n < H)[None, :])


@triton.jit
def _g2_tma_kernel(a_desc, w_desc, topk_weights_ptr, pair_out_ptr, sorted_pairs_ptr,
                   block_experts_ptr, expert_offsets_ptr, num_experts, num_pairs, H, I,
                   stride_om, PERSISTENT: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    used_blocks = tl.load(expert_offsets_ptr + num_experts) // BLOCK_M
    num_n = tl.cdiv(H, BLOCK_N)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), used_blocks * num_n, NUM_PROGRAMS, flatten=True):
            pid_m, pid_n = _tile_of(tile, used_blocks, num_n, GROUP_M)
            _g2_tile(a_desc, w_desc, topk_weights_ptr, pair_out_ptr, sorted_pairs_ptr,
                     block_experts_ptr, num_pairs, H, I, stride_om, pid_m, pid_n,
                     BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        tile = tl.program_id(0)
        if tile < used_blocks * num_n:
            pid_m, pid_n = _tile_of(tile, used_blocks, num_n, GROUP_M)
            _g2_tile(a_desc, w_desc, topk_weights_ptr, pair_out_ptr, sorted_pairs_ptr,
                     block_experts_ptr, num_pairs, H, I, stride_om, pid_m, pid_n,
                     BLOCK_M, BLOCK_N, BLOCK_K)


def run_cell(name: str, num_tokens: int, log) -> list[dict]:
    preset = get_preset(name)
    dev = torch.device("cuda")
    wts = make_weights(preset, torch.bfloat16, dev)
    hidden, topk = make_tokens(preset, num_tokens, torch.bfloat16, dev)
    ids, weights = topk.ids.to(torch.int32), topk.weights.float()
    E, N1, H = wts.w13.shape
    I = wts.w2.shape[2]
    k = ids.shape[1]
    cfg = default_config(num_tokens, E, k, H, I)
    bm, c1, c2 = cfg.block_m, cfg.gemm1, cfg.gemm2
    act, has_bias = preset.activation, wts.b13 is not None
    plan = dispatch_plan(ids, E, bm, backend="triton")
    nblocks = plan.capacity // bm
    inter = torch.zeros((plan.capacity, I), dtype=torch.bfloat16, device=dev)
    pair_out = torch.zeros((plan.num_pairs, H), dtype=torch.bfloat16, device=dev)
    out = torch.empty((num_tokens, H), dtype=torch.bfloat16, device=dev)
    dummy = weights
    flops1 = 2 * num_tokens * k * N1 * H
    flops2 = 2 * num_tokens * k * H * I
    rows = []

    def record(stage, us, flops=0, err=None):
        tf = flops / us / 1e6 if flops else None
        rows.append({"preset": name, "M": num_tokens, "stage": stage, "us": round(us, 2),
                     "TFLOPs": None if tf is None else round(tf, 1), "max_err": err})
        log(f"{name} M={num_tokens} {stage}: {us:.1f} µs" + (f", {tf:.0f} TFLOP/s" if tf else "")
            + ("" if err is None else f", max|Δ| {err:.3g}"))

    def g1_ptr():
        _gemm1_kernel[(nblocks * triton.cdiv(I, c1.block_n),)](
            hidden, wts.w13, None, dummy if wts.b13 is None else wts.b13, weights, inter,
            plan.sorted_pairs, plan.block_experts, plan.block_experts, plan.num_pairs, nblocks,
            H, I, k,
            hidden.stride(0), wts.w13.stride(0), wts.w13.stride(1),
            0 if wts.b13 is None else wts.b13.stride(0), inter.stride(0), 1.702, 7.0,
            ACTIVATION=act, GATED=True, HAS_BIAS=has_bias, WEIGHT_ON_INPUT=False,
            EVEN_K=H % c1.block_k == 0, EVEN_N=I % c1.block_n == 0, W_TMA=False,
            DOT_PRECISION=None, TAIL_M=0,
            BLOCK_M=bm, BLOCK_N=c1.block_n, BLOCK_K=c1.block_k, GROUP_M=c1.group_m,
            num_warps=c1.num_warps, num_stages=c1.num_stages)

    def g2_ptr():
        _gemm2_kernel[(nblocks * triton.cdiv(H, c2.block_n),)](
            inter, None, wts.w2, None, dummy if wts.b2 is None else wts.b2, weights,
            pair_out, plan.sorted_pairs, plan.block_experts, plan.expert_offsets,
            plan.expert_offsets, E, plan.num_pairs,
            nblocks, H, I,
            inter.stride(0), wts.w2.stride(0), wts.w2.stride(1),
            0 if wts.b2 is None else wts.b2.stride(0), pair_out.stride(0),
            WEIGHT_ON_OUTPUT=True, HAS_BIAS=wts.b2 is not None, EVEN_K=I % c2.block_k == 0,
            EVEN_N=H % c2.block_n == 0, TMA=False, PERSISTENT=False, NUM_PROGRAMS=1,
            DOT_PRECISION=None, TAIL_M=0, BLOCK_M=bm, BLOCK_N=c2.block_n,
            BLOCK_K=c2.block_k, GROUP_M=c2.group_m, num_warps=c2.num_warps,
            num_stages=c2.num_stages)

    def combine():
        _combine_kernel[(num_tokens, triton.cdiv(H, 1024))](
            pair_out, ids, out, H, E, pair_out.stride(0), out.stride(0), TOP_K=k, BLOCK_H=1024)

    record("plan", graph_replay_us(lambda: dispatch_plan(ids, E, bm, backend="triton"), REP_MS))
    record("gemm1.ptr", graph_replay_us(g1_ptr, REP_MS), flops1)
    ref_inter = inter.clone()
    record("gemm2.ptr", graph_replay_us(g2_ptr, REP_MS), flops2)
    ref_pair = pair_out.clone()
    record("combine", graph_replay_us(combine, REP_MS))
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    # TMA variants: silu without biases only (the experiment's kernels are minimal).
    if act != "silu" or has_bias:
        return rows
    w13_2d = wts.w13.view(E * N1, H)
    w2_2d = wts.w2.view(E * H, I)
    for bn, bk, warps, stages in ((128, 64, 8, 4), (128, 64, 8, 3)):
        desc = TensorDescriptor(w13_2d, list(w13_2d.shape), list(w13_2d.stride()), [bn, bk])
        for persistent in (False, True):
            grid = (sms,) if persistent else (nblocks * triton.cdiv(I, bn),)

            def g1_tma(desc=desc, grid=grid, persistent=persistent, bn=bn, bk=bk, warps=warps,
                       stages=stages):
                _g1_tma_kernel[grid](
                    hidden, desc, inter, plan.sorted_pairs, plan.block_experts,
                    plan.expert_offsets, E, plan.num_pairs, H, I, N1, k, hidden.stride(0),
                    inter.stride(0), PERSISTENT=persistent, NUM_PROGRAMS=grid[0], BLOCK_M=bm,
                    BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)

            label = f"gemm1.tmaB{'.pers' if persistent else ''}[{bn}x{bk} w{warps} s{stages}]"
            try:
                inter.fill_(float("nan"))
                us = graph_replay_us(g1_tma, REP_MS)
                valid = plan.sorted_pairs < plan.num_pairs
                err = (inter[valid].float() - ref_inter[valid].float()).abs().max().item()
                record(label, us, flops1, err)
            except Exception as exc:  # an experiment: report and go on
                log(f"{name} M={num_tokens} {label}: failed: {str(exc)[:300]}")
    inter.copy_(ref_inter)
    for bn, bk, warps, stages in ((256, 64, 8, 3), (128, 64, 8, 4)):
        a_desc = TensorDescriptor(inter, list(inter.shape), list(inter.stride()), [bm, bk])
        w_desc = TensorDescriptor(w2_2d, list(w2_2d.shape), list(w2_2d.stride()), [bn, bk])
        for persistent in (False, True):
            grid = (sms,) if persistent else (nblocks * triton.cdiv(H, bn),)

            def g2_tma(a_desc=a_desc, w_desc=w_desc, grid=grid, persistent=persistent, bn=bn,
                       bk=bk, warps=warps, stages=stages):
                _g2_tma_kernel[grid](
                    a_desc, w_desc, weights, pair_out, plan.sorted_pairs, plan.block_experts,
                    plan.expert_offsets, E, plan.num_pairs, H, I, pair_out.stride(0),
                    PERSISTENT=persistent, NUM_PROGRAMS=grid[0], BLOCK_M=bm, BLOCK_N=bn,
                    BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)

            label = f"gemm2.tma{'.pers' if persistent else ''}[{bn}x{bk} w{warps} s{stages}]"
            try:
                pair_out.fill_(float("nan"))
                us = graph_replay_us(g2_tma, REP_MS)
                err = (pair_out.float() - ref_pair.float()).abs().max().item()
                record(label, us, flops2, err)
            except Exception as exc:
                log(f"{name} M={num_tokens} {label}: failed: {str(exc)[:300]}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="directory of tma-experiment.json")
    parser.add_argument("--cells", nargs="*", default=None, help="preset:M pairs")
    args = parser.parse_args()
    cells = CELLS if not args.cells else [(c.split(":")[0], int(c.split(":")[1]))
                                          for c in args.cells]
    rows = []
    for name, num_tokens in cells:
        rows += run_cell(name, num_tokens, lambda s: print(s, flush=True))
        torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": triton.__version__, "command": " ".join(sys.argv)}
    Path(args.out, "tma-experiment.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
