"""Triton kernels of the fp8 gathered experts path: the fp8 plan path's GEMMs, no plan.

    _gathered_gemm1_fp8_kernel  grid (row steps × I-tiles): a step of BLOCK_M pairs of one
                                expert, found in topk_ids: fp8 rows of hidden
                                (quantised once, M rows) × w13[e]ᵀ, scales, bias,
                                activation, quantised again as GEMM2's input (1×g groups
                                or the static scale) → fp8 `inter` [M*k, I] in pair order
    _gathered_gemm2_fp8_kernel  grid (row steps × H-tiles): those rows of `inter` ×
                                w2[e]ᵀ, scales, bias, × router weight → `pair_out`
                                [M*k, H]; then each token's rows of the column tile summed
                                in slot order by the program that stores the last of them

As `moekit._gathered_kernels` for 16-bit layers (the ranking of experts and rows, the
counters, the sums), around the fp8 plan path's K loops and epilogues (`_gemm1_fp8_rows`,
`_gemm2_fp8_operands`, `_gemm2_fp8_sums`, `_gemm2_fp8_store`): the output equals the plan
path's bitwise at the same tiles, where the plan path's GEMM2 runs in one K part.
"""

import triton
import triton.language as tl

from moekit._experts_fp8_kernels import (
    _gemm1_fp8_rows,
    _gemm2_fp8_operands,
    _gemm2_fp8_store,
    _gemm2_fp8_sums,
)
from moekit._experts_kernels import _aligned
from moekit._gathered_kernels import (
    _program_step,
    _rows_of,
    _sum_finished_tokens,
    _zero_counters,
    _zero_idle_tokens,
)


@triton.jit
def _gathered_gemm1_fp8_kernel(
    x_ptr,  # [M, H] fp8: hidden, quantised
    xs_ptr,  # hidden's scales: xs[token * stride_xsm + (k // X_GROUP_K) * stride_xsk]
    w13_ptr,  # [E, N1, H] fp8; N1 = 2I (gate rows, then up rows) or I (relu2)
    ws_ptr,  # w13's scales: ws[e * s_we + (n // W_GROUP_N) * s_wn + (k // W_GROUP_K) * s_wk]
    b13_ptr,  # [E, N1] (read only when HAS_BIAS)
    topk_ids_ptr,  # [M*k] int32 or int64
    inter_ptr,  # [M*k, I] fp8, out
    inter_scale_ptr,  # [M*k, ceil(I / INTER_GROUP)] fp32 out; static: [1], read
    arrivals_ptr,  # [M, H-tiles] int32: GEMM2's counters, zeroed here
    num_experts,
    num_pairs,
    H,
    I,
    top_k,
    arrival_count,  # M × GEMM2's column tiles
    stride_xm,
    stride_xsm,
    stride_xsk,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_wsk,
    stride_be,
    stride_im,
    stride_ism,
    alpha,
    limit,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    X_PER_K: tl.constexpr,
    X_GROUP_K: tl.constexpr,
    W_PER_K: tl.constexpr,
    W_GROUP_N: tl.constexpr,
    W_GROUP_K: tl.constexpr,
    W_UNIFORM_N: tl.constexpr,  # the column tile lies inside one scale group of N
    INTER_STATIC: tl.constexpr,
    INTER_GROUP: tl.constexpr,  # divides BLOCK_N (dynamic)
    SPLIT_N: tl.constexpr,  # two column halves, one K loop each (`_gemm1_fp8_kernel`)
    FMAX: tl.constexpr,
    AMAX_FLOOR: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # divides H, I and the row strides (`_aligned`)
    PAIRS: tl.constexpr,  # M*k rounded up to a power of two, at least BLOCK_M
    EXPERTS: tl.constexpr,  # E rounded up to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,  # the K loop's products transposed (`moekit._fp8_swap`)
):
    """One program: one row step (`_program_step`) × BLOCK_N intermediate columns;
    programs also zero GEMM2's arrival counters (`_zero_counters`)."""
    H = _aligned(H, ROW_ALIGN)
    I = _aligned(I, ROW_ALIGN)
    stride_xm = _aligned(stride_xm, ROW_ALIGN)
    stride_we = _aligned(stride_we, ROW_ALIGN)
    stride_wn = _aligned(stride_wn, ROW_ALIGN)
    stride_im = _aligned(stride_im, ROW_ALIGN)
    _zero_counters(arrivals_ptr, arrival_count)
    _, pid_n, ids, valid, expert, first, active = _program_step(
        topk_ids_ptr, num_experts, num_pairs, tl.cdiv(I, BLOCK_N), PAIRS, EXPERTS, BLOCK_M)
    if active:
        pairs, row_ok = _rows_of(topk_ids_ptr, num_pairs, ids, valid, expert, first, PAIRS,
                                 BLOCK_M)
        _gemm1_fp8_rows(
            x_ptr, xs_ptr, w13_ptr, None, ws_ptr, b13_ptr, inter_ptr, inter_scale_ptr, pairs,
            row_ok, pairs.to(tl.int64), expert, pid_n, H, I, top_k, stride_xm, stride_xsm,
            stride_xsk, stride_we, stride_wn, stride_wse, stride_wsn, stride_wsk, stride_be,
            stride_im, stride_ism, alpha, limit, ACTIVATION, GATED, HAS_BIAS, EVEN_K, EVEN_N,
            False, X_PER_K, X_GROUP_K, W_PER_K, W_GROUP_N, W_GROUP_K, W_UNIFORM_N,
            INTER_STATIC, INTER_GROUP, SPLIT_N, FMAX, AMAX_FLOOR, BLOCK_M, BLOCK_N, BLOCK_K,
            SWAP_AB,
        )


@triton.jit
def _gathered_gemm2_fp8_kernel(
    inter_ptr,  # [M*k, I] fp8
    as_ptr,  # inter's scales: as[row * stride_asm + (k // A_GROUP_K) * stride_ask]
    w2_ptr,  # [E, H, I] fp8
    ws_ptr,  # w2's scales, addressed as w13's in GEMM1
    b2_ptr,  # [E, H] (read only when HAS_BIAS)
    topk_ids_ptr,  # [M*k] int32 or int64
    topk_weights_ptr,  # [M*k] fp32 or 16-bit
    pair_out_ptr,  # [M*k, H], out: each pair's weighted row
    out_ptr,  # [M, H], out
    arrivals_ptr,  # [M, H-tiles] int32, zeroed by GEMM1
    num_experts,
    num_tokens,
    H,
    I,
    stride_im,
    stride_asm,
    stride_ask,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_wsk,
    stride_be,
    stride_pm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    A_PER_K: tl.constexpr,
    A_GROUP_K: tl.constexpr,
    W_PER_K: tl.constexpr,
    W_GROUP_N: tl.constexpr,
    W_GROUP_K: tl.constexpr,
    W_UNIFORM_N: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # divides H, I and the row strides (`_aligned`)
    TOP_K: tl.constexpr,
    SLOTS: tl.constexpr,  # TOP_K rounded up to a power of two
    PAIRS: tl.constexpr,  # M*k rounded up to a power of two, at least BLOCK_M
    EXPERTS: tl.constexpr,  # E rounded up to a power of two
    TOKENS: tl.constexpr,  # M rounded up to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,  # the K loop's products transposed (`moekit._fp8_swap`)
):
    """One program: one row step × BLOCK_N hidden columns (as in GEMM1), then the sums of
    the tokens whose last row it stored."""
    H = _aligned(H, ROW_ALIGN)
    I = _aligned(I, ROW_ALIGN)
    stride_im = _aligned(stride_im, ROW_ALIGN)
    stride_we = _aligned(stride_we, ROW_ALIGN)
    stride_wn = _aligned(stride_wn, ROW_ALIGN)
    stride_pm = _aligned(stride_pm, ROW_ALIGN)
    stride_om = _aligned(stride_om, ROW_ALIGN)
    num_n = tl.cdiv(H, BLOCK_N)
    step, pid_n, ids, valid, expert, first, active = _program_step(
        topk_ids_ptr, num_experts, num_tokens * TOP_K, num_n, PAIRS, EXPERTS, BLOCK_M)
    _zero_idle_tokens(valid, out_ptr, num_tokens, step, tl.num_programs(0) // num_n, pid_n, H,
                      stride_om, TOP_K, PAIRS, TOKENS, BLOCK_N)
    expert64 = expert.to(tl.int64)
    if active:
        pairs, row_ok = _rows_of(topk_ids_ptr, num_tokens * TOP_K, ids, valid, expert, first,
                                 PAIRS, BLOCK_M)
        offs_n, col_ok, a_ptrs, b_ptrs, w_row, as_rows, ws_cols, ws_cols0 = (
            _gemm2_fp8_operands(inter_ptr, as_ptr, w2_ptr, ws_ptr, expert, expert64,
                                pairs.to(tl.int64), pid_n, H, stride_im, stride_asm, stride_we,
                                stride_wn, stride_wse, stride_wsn, W_GROUP_N, BLOCK_N, BLOCK_K))
        acc = _gemm2_fp8_sums(
            a_ptrs, None, b_ptrs, None, w_row, as_rows, ws_cols, ws_cols0, col_ok, 0, BLOCK_M,
            0, I, stride_ask, stride_wsk, EVEN_K, EVEN_N, False, A_PER_K, A_GROUP_K, W_PER_K,
            W_GROUP_K, W_UNIFORM_N, False, BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, 1,
        )
        _gemm2_fp8_store(
            acc, as_rows, ws_cols, ws_cols0, b2_ptr, topk_weights_ptr, pair_out_ptr, expert64,
            pairs, row_ok, offs_n, col_ok, BLOCK_M, 0, stride_be, stride_pm, 0, HAS_BIAS,
            A_PER_K, W_PER_K, W_UNIFORM_N, False, 1,
        )
        _sum_finished_tokens(pair_out_ptr, out_ptr, arrivals_ptr, topk_ids_ptr, pairs, row_ok,
                             pid_n, num_n, num_experts, H, stride_pm, stride_om, TOP_K, SLOTS,
                             BLOCK_N)
