"""The fp8 gathered experts path: the fp8 plan path's tiles, without the plan or combine.

    hidden [M, H] ─► _quantize_rows_kernel (the direct path's quantiser): fp8 rows, scales
                  ─► _gathered_gemm1_fp8_kernel: per (row step, I-tile), ≤ block_m rows of one
                     expert × w13[e]ᵀ, scales, bias, activation, quantised for GEMM2
                                                              ─► fp8 inter [M*k, I]
                  ─► _gathered_gemm2_fp8_kernel: per (row step, H-tile), inter rows ×
                     w2[e]ᵀ, scales, bias, × weight; each token's rows summed in slot order
                     by the program that stores its last one            ─► out [M, H]

The fp8 plan path at decode is four or five launches (amax, plan with the quantiser,
GEMM1, GEMM2, combine); this is three or four, the GEMMs' tiles the plan path's
(`moekit.experts_gathered` has the 16-bit form and why). GEMM2 always runs in one K part.
Chosen by `ExpertsConfig.gathered`.
"""

from __future__ import annotations

import torch

from moekit._experts_fp8_kernels import SPLIT_BLOCK_M
from moekit._fp8_quantize import AMAX_FLOOR, FMAX
from moekit._fp8_scales import uniform_along_n, weight_scale_layout
from moekit._fp8_swap import launch_stages, swap_ab
from moekit._gathered_fp8_kernels import _gathered_gemm1_fp8_kernel, _gathered_gemm2_fp8_kernel
from moekit._intmath import cdiv, next_power_of_2, row_align
from moekit._launch import launcher
from moekit.experts_gathered import gemm2_arrivals, pairs_bound, row_steps_bound
from moekit.quant.scheme import FULL


def launch_gathered_experts_fp8(hidden_in, w13_q, w13_scale, w2_q, w2_scale, input_scale2,
                                topk_ids, topk_weights, b13, b2, activation, alpha, limit,
                                groups, config, out) -> None:
    """GEMM1 (GEMM2's input quantised in its epilogue) and GEMM2 with the sums.
    `hidden_in`: hidden as `experts_fp8._gemm1_input` quantised it (M rows); `groups` is
    `experts_fp8._groups_to_list`'s form of the scheme, `config` `ExpertsConfig.as_ints`'s;
    `input_scale2` is GEMM2's static input scale, or None (quantised dynamically)."""
    arrivals = gemm2_arrivals(topk_ids.shape[0], out.shape[1], config[6], out.device)
    inter_q, inter_scale, inter_strides = launch_gathered_gemm1_fp8(
        hidden_in, w13_q, w13_scale, b13, topk_ids, w2_q.shape[2], activation, alpha, limit,
        groups, input_scale2, config[0], config[1:6], arrivals)
    launch_gathered_gemm2_fp8(inter_q, inter_scale, inter_strides, input_scale2 is not None,
                              w2_q, w2_scale, b2, topk_ids, topk_weights, groups, config[0],
                              config[6:11], out, arrivals)


def launch_gathered_gemm1_fp8(hidden_in, w13_q, w13_scale, b13, topk_ids, inter_size,
                              activation, alpha, limit, groups, input_scale2, block_m, tiles,
                              arrivals):
    """GEMM1 + activation of every pair, quantised as GEMM2's input; zeroes `arrivals`.
    Returns (fp8 `inter` [M*k, I] in pair order, its scales — [M*k, groups of I], or the
    static `input_scale2` —, the scales' (row, K-group) strides)."""
    x_q = hidden_in.x
    num_tokens, hidden_size = x_q.shape
    num_experts = w13_q.shape[0]
    top_k = topk_ids.shape[1]
    w_group_n, w_group_k, _, a_group_k, inter_group = groups
    block_n, block_k, _, warps, stages = tiles
    w_per_k = w_group_k != FULL
    rows = num_tokens * top_k
    inter_q = torch.empty((rows, inter_size), dtype=torch.float8_e4m3fn, device=x_q.device)
    static = input_scale2 is not None
    if static:
        inter_scale, strides, inter_group = input_scale2, (0, 0), 1
    else:
        inter_scale = torch.empty((rows, cdiv(inter_size, inter_group)), dtype=torch.float32,
                                  device=x_q.device)
        strides = (inter_scale.stride(0), 1)
    ws = weight_scale_layout(w13_scale, w_group_n, w_group_k)
    gated = activation != "relu2"
    split = gated and block_m >= SPLIT_BLOCK_M  # as the plan path's GEMM1
    swap = swap_ab("plan1", block_m, block_n // 2 if split else block_n, w_per_k)
    grid = row_steps_bound(num_tokens, top_k, num_experts, block_m) * cdiv(inter_size, block_n)
    launcher(_gathered_gemm1_fp8_kernel)[(grid,)](
        x_q, hidden_in.scale, w13_q, w13_scale, w13_scale if b13 is None else b13, topk_ids,
        inter_q, inter_scale, arrivals, num_experts, rows, hidden_size, inter_size, top_k,
        arrivals.numel(), x_q.stride(0), hidden_in.stride_sm, hidden_in.stride_sk,
        w13_q.stride(0), w13_q.stride(1), *ws[:3], 0 if b13 is None else b13.stride(0),
        inter_q.stride(0), strides[0], float(alpha), float(limit),
        ACTIVATION=activation, GATED=gated, HAS_BIAS=b13 is not None,
        EVEN_K=hidden_size % block_k == 0, EVEN_N=inter_size % block_n == 0,
        X_PER_K=a_group_k != FULL, X_GROUP_K=hidden_in.group_k, W_PER_K=w_per_k,
        W_GROUP_N=ws[3], W_GROUP_K=ws[4], W_UNIFORM_N=uniform_along_n(ws, block_n, inter_size),
        INTER_STATIC=static, INTER_GROUP=inter_group, SPLIT_N=split, FMAX=FMAX,
        AMAX_FLOOR=AMAX_FLOOR,
        ROW_ALIGN=row_align(hidden_size, inter_size, x_q.stride(0), w13_q.stride(0),
                            w13_q.stride(1), inter_q.stride(0)),
        PAIRS=pairs_bound(rows, block_m), EXPERTS=next_power_of_2(num_experts), BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, SWAP_AB=swap, num_warps=warps,
        num_stages=launch_stages(swap, stages, cdiv(hidden_size, block_k)),
    )
    return inter_q, inter_scale, strides


def launch_gathered_gemm2_fp8(inter_q, inter_scale, inter_strides, static, w2_q, w2_scale, b2,
                              topk_ids, topk_weights, groups, block_m, tiles, out,
                              arrivals) -> None:
    """GEMM2 (+bias, × router weight) of every pair, each token's slots summed into `out`
    [M, H]; the inputs are `launch_gathered_gemm1_fp8`'s, `arrivals` as it left them."""
    num_experts, hidden_size, inter_size = w2_q.shape
    num_tokens, top_k = topk_ids.shape
    w_group_n, w_group_k, _, _, inter_group = groups
    block_n, block_k, _, warps, stages = tiles
    w_per_k = w_group_k != FULL
    ws = weight_scale_layout(w2_scale, w_group_n, w_group_k)
    swap = swap_ab("plan2", block_m, block_n, w_per_k)
    pair_out = torch.empty((num_tokens * top_k, hidden_size), dtype=out.dtype,
                           device=out.device)
    grid = row_steps_bound(num_tokens, top_k, num_experts, block_m) * cdiv(hidden_size, block_n)
    launcher(_gathered_gemm2_fp8_kernel)[(grid,)](
        inter_q, inter_scale, w2_q, w2_scale, w2_scale if b2 is None else b2, topk_ids,
        topk_weights, pair_out, out, arrivals, num_experts, num_tokens, hidden_size,
        inter_size, inter_q.stride(0), *inter_strides, w2_q.stride(0), w2_q.stride(1),
        *ws[:3], 0 if b2 is None else b2.stride(0), pair_out.stride(0), out.stride(0),
        HAS_BIAS=b2 is not None, EVEN_K=inter_size % block_k == 0,
        EVEN_N=hidden_size % block_n == 0, A_PER_K=not static,
        A_GROUP_K=1 if static else inter_group, W_PER_K=w_per_k, W_GROUP_N=ws[3],
        W_GROUP_K=ws[4], W_UNIFORM_N=uniform_along_n(ws, block_n, 0),
        ROW_ALIGN=row_align(hidden_size, inter_size, inter_q.stride(0), w2_q.stride(0),
                            w2_q.stride(1), pair_out.stride(0), out.stride(0)),
        TOP_K=top_k, SLOTS=next_power_of_2(top_k), PAIRS=pairs_bound(num_tokens * top_k, block_m),
        EXPERTS=next_power_of_2(num_experts), TOKENS=next_power_of_2(num_tokens),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SWAP_AB=swap, num_warps=warps,
        num_stages=launch_stages(swap, stages, cdiv(inter_size, block_k)),
    )
