"""Triton kernels of the direct (plan-free) experts path, for a handful of tokens.

    _direct_gemm1_kernel  grid (M*k pairs, I-tiles): the pair's token row × w13[e]ᵀ, + bias,
                          activation; writes `inter` [M*k, I] in pair order
    _direct_gemm2_kernel  grid (M, H-tiles): Σ_j weight_j · (inter[m*k + j] × w2[e_j]ᵀ + b2),
                          the k slots in order, so the combine is fused and deterministic

At decode a token reaches k experts with one row each, so the GEMMs are matrix-vector
products that stream weights: each program reduces a [BLOCK_N, BLOCK_K] weight tile
against one activation row with CUDA-core FMAs into an fp32 tile, summed across K once
at the end. Ids are read straight from `topk_ids`, so no dispatch plan is built, and no
`pair_out` is written and re-read by a combine: two launches instead of four.

Pairs that share an expert read its weights once per pair; consecutive programs of the
grid are the pairs (or tokens) of one column tile, so such re-reads mostly come from
L2. A pair whose id is outside [0, E) is skipped by both kernels: GEMM1 leaves its
`inter` row unwritten and GEMM2 masks every load of it, so the row's contents never
matter. Row offsets are 64-bit, offsets within a weight tile 32-bit.
"""

import triton
import triton.language as tl

from moekit._experts_kernels import _activate


@triton.jit
def _row_chunk(ptrs, k0, offs_k, K, EVEN_K: tl.constexpr):
    """BLOCK_K values of one activation row from column k0, as fp32."""
    if EVEN_K:
        return tl.load(ptrs).to(tl.float32)
    return tl.load(ptrs, mask=offs_k + k0 < K, other=0.0).to(tl.float32)


@triton.jit
def _weight_rows(ptrs, k0, col_ok, offs_k, K, valid, EVEN_K: tl.constexpr,
                 EVEN_N: tl.constexpr, CHECK: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] tile of a weight stored [N, K] (rows are output columns), as
    fp32; with CHECK the scalar `valid` masks the whole tile."""
    mask = (col_ok[:, None] | EVEN_N) & ((offs_k + k0 < K)[None, :] | EVEN_K)
    if CHECK:
        mask = mask & valid
    if EVEN_K and EVEN_N and not CHECK:
        return tl.load(ptrs).to(tl.float32)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _direct_gemm1_kernel(
    hidden_ptr,  # [M, H]
    w13_ptr,  # [E, N1, H]; N1 = 2I (gate rows, then up rows) or I (relu2)
    b13_ptr,  # [E, N1] (read only when HAS_BIAS)
    topk_ids_ptr,  # [M*k] int32
    topk_weights_ptr,  # [M*k] fp32 (read only when WEIGHT_ON_INPUT)
    inter_ptr,  # [M*k, I], out
    num_experts,
    H,
    I,
    top_k,
    stride_hm,
    stride_we,
    stride_wn,
    stride_be,
    stride_im,
    alpha,
    limit,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: one pair × BLOCK_N intermediate columns."""
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(topk_ids_ptr + pair)
    if (expert < 0) | (expert >= num_experts):
        return
    token = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = hidden_ptr + token * stride_hm + offs_k
    g_ptrs = (w13_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None] * stride_wn
              + offs_k[None, :])
    u_ptrs = g_ptrs + I * stride_wn

    gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        x = _row_chunk(x_ptrs, k0, offs_k, H, EVEN_K)[None, :]
        gate += _weight_rows(g_ptrs, k0, col_ok, offs_k, H, True, EVEN_K, EVEN_N, False) * x
        if GATED:
            up += _weight_rows(u_ptrs, k0, col_ok, offs_k, H, True, EVEN_K, EVEN_N, False) * x
            u_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
    gate_n = tl.sum(gate, axis=1)
    up_n = tl.sum(up, axis=1)

    if WEIGHT_ON_INPUT:
        w = tl.load(topk_weights_ptr + pair)
        gate_n = gate_n * w
        up_n = up_n * w
    if HAS_BIAS:
        b_base = b13_ptr + expert.to(tl.int64) * stride_be
        gate_n += tl.load(b_base + offs_n, mask=col_ok, other=0.0).to(tl.float32)
        if GATED:
            up_n += tl.load(b_base + I + offs_n, mask=col_ok, other=0.0).to(tl.float32)
    result = _activate(gate_n, up_n, ACTIVATION, alpha, limit)
    out_ptrs = inter_ptr + pair.to(tl.int64) * stride_im + offs_n
    tl.store(out_ptrs, result.to(inter_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _direct_gemm2_kernel(
    inter_ptr,  # [M*k, I]
    w2_ptr,  # [E, H, I]
    b2_ptr,  # [E, H] (read only when HAS_BIAS)
    topk_ids_ptr,  # [M*k] int32
    topk_weights_ptr,  # [M*k] fp32
    out_ptr,  # [M, H], out
    num_experts,
    H,
    I,
    stride_im,
    stride_we,
    stride_wn,
    stride_be,
    stride_om,
    WEIGHT_ON_OUTPUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: one token × BLOCK_N hidden columns, summed over its k slots.

    The slot and K loops are one loop (slot = step // K-steps), so loads of the next
    slot's weights are in flight while this slot finishes. Router weights scale the
    activation chunk before the product; a skipped slot's weight and loads are zero.
    """
    token = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    k_steps = tl.cdiv(I, BLOCK_K)
    rows = offs_n[:, None] * stride_wn + offs_k[None, :]

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for step in range(0, TOP_K * k_steps):
        slot = step // k_steps
        k0 = (step - slot * k_steps) * BLOCK_K
        pair = token * TOP_K + slot
        expert = tl.load(topk_ids_ptr + pair)
        valid = (expert >= 0) & (expert < num_experts)
        scale = 1.0
        if WEIGHT_ON_OUTPUT:
            scale = tl.load(topk_weights_ptr + pair)
        a_ptrs = inter_ptr + pair.to(tl.int64) * stride_im + k0 + offs_k
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid, other=0.0).to(tl.float32)
        else:
            a = tl.load(a_ptrs, mask=valid & (offs_k + k0 < I), other=0.0).to(tl.float32)
        b_ptrs = w2_ptr + tl.where(valid, expert, 0).to(tl.int64) * stride_we + k0 + rows
        b = _weight_rows(b_ptrs, k0, col_ok, offs_k, I, valid, EVEN_K, EVEN_N, True)
        acc += b * (a * scale)[None, :]
    result = tl.sum(acc, axis=1)

    if HAS_BIAS:
        for slot in tl.static_range(TOP_K):
            pair = token * TOP_K + slot
            expert = tl.load(topk_ids_ptr + pair)
            valid = (expert >= 0) & (expert < num_experts)
            scale = 1.0
            if WEIGHT_ON_OUTPUT:
                scale = tl.load(topk_weights_ptr + pair)
            b_ptrs = b2_ptr + tl.where(valid, expert, 0).to(tl.int64) * stride_be + offs_n
            bias = tl.load(b_ptrs, mask=col_ok & valid, other=0.0).to(tl.float32)
            result += bias * scale
    out_ptrs = out_ptr + token.to(tl.int64) * stride_om + offs_n
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=col_ok)
