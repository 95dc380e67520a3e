"""Triton kernels of the fused experts pipeline.

    _gemm1_kernel     grid (blocks × I-tiles): rows of `hidden` gathered through the
                      dispatch plan, times w13[e]ᵀ, + bias, activation in the epilogue;
                      writes `inter` [capacity, I] in plan-slot order (contiguous per expert)
    _gemm2_kernel     grid (blocks × H-tiles): inter rows × w2[e]ᵀ, + bias, × router weight;
                      writes one row per pair, `pair_out` [M*k, H]
    _combine_kernel   grid (M, H-tiles): out[m] = Σ_j pair_out[m*k + j] over valid slots,
                      in slot order, so the result is deterministic

A program whose block holds no expert (−1: past the last run) exits at once. Row
offsets into `hidden`, `pair_out` and the per-expert weight bases are 64-bit (M·k·H and
E·2I·H can exceed 2^31); offsets inside a tile stay 32-bit.
"""

import triton
import triton.language as tl


@triton.jit
def _activate(gate, up, ACTIVATION: tl.constexpr, alpha, limit):
    """Epilogue activation on fp32 tiles (formulas in `moekit.activation`)."""
    if ACTIVATION == "silu":
        return gate / (1.0 + tl.exp(-gate)) * up
    elif ACTIVATION == "gelu":
        return 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)) * up
    elif ACTIVATION == "gelu_tanh":
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        tanh = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        return 0.5 * gate * (1.0 + tanh) * up
    elif ACTIVATION == "swigluoai":
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        return (u + 1.0) * g / (1.0 + tl.exp(-alpha * g))
    else:  # relu2: no gate; `gate` holds the only projection
        r = tl.maximum(gate, 0.0)
        return r * r


@triton.jit
def _tile_coords(num_m, num_n, GROUP_M: tl.constexpr):
    """Program id → (row block, column tile), GROUP_M row blocks sharing columns in L2."""
    pid = tl.program_id(0)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _gemm1_kernel(
    hidden_ptr,  # [M, H]
    w13_ptr,  # [E, N1, H]; N1 = 2I (gate rows, then up rows) or I (relu2)
    b13_ptr,  # [E, N1] (read only when HAS_BIAS)
    topk_weights_ptr,  # [M*k] fp32 (read only when WEIGHT_ON_INPUT)
    inter_ptr,  # [capacity, I], out
    sorted_pairs_ptr,  # [capacity] int32
    block_experts_ptr,  # [capacity / BLOCK_M] int32
    num_pairs,
    num_blocks,
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
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program: BLOCK_M plan slots (one expert) × BLOCK_N intermediate columns."""
    pid_m, pid_n = _tile_coords(num_blocks, tl.cdiv(I, BLOCK_N), GROUP_M)
    expert = tl.load(block_experts_ptr + pid_m)
    if expert < 0:
        return
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + slots)
    row_ok = pairs < num_pairs
    tokens = tl.where(row_ok, pairs // top_k, 0).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = hidden_ptr + tokens[:, None] * stride_hm + offs_k[None, :]
    w_base = w13_ptr + expert.to(tl.int64) * stride_we
    g_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    u_ptrs = g_ptrs + I * stride_wn

    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Padding rows read token 0 (a valid row) unmasked: a dot's output row depends only on
    # its own input row, and padding rows are never stored.
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K and EVEN_N:
            a = tl.load(a_ptrs)
            g = tl.load(g_ptrs)
        elif EVEN_K:
            a = tl.load(a_ptrs)
            g = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = offs_k + k0 < H
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        gate = tl.dot(a, g, gate, input_precision=DOT_PRECISION)
        if GATED:
            if EVEN_K and EVEN_N:
                u = tl.load(u_ptrs)
            elif EVEN_K:
                u = tl.load(u_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                u = tl.load(u_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            up = tl.dot(a, u, up, input_precision=DOT_PRECISION)
            u_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K

    if WEIGHT_ON_INPUT:
        w = tl.load(topk_weights_ptr + pairs, mask=row_ok, other=0.0)
        gate = gate * w[:, None]
        up = up * w[:, None]
    if HAS_BIAS:
        b_base = b13_ptr + expert.to(tl.int64) * stride_be
        gate += tl.load(b_base + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up += tl.load(b_base + I + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    result = _activate(gate, up, ACTIVATION, alpha, limit)

    out_ptrs = inter_ptr + slots.to(tl.int64)[:, None] * stride_im + offs_n[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptrs, result.to(inter_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _gemm2_kernel(
    inter_ptr,  # [capacity, I]
    w2_ptr,  # [E, H, I]
    b2_ptr,  # [E, H] (read only when HAS_BIAS)
    topk_weights_ptr,  # [M*k] fp32
    pair_out_ptr,  # [M*k, H], out
    sorted_pairs_ptr,  # [capacity] int32
    block_experts_ptr,  # [capacity / BLOCK_M] int32
    num_pairs,
    num_blocks,
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
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program: BLOCK_M plan slots (one expert) × BLOCK_N hidden columns."""
    pid_m, pid_n = _tile_coords(num_blocks, tl.cdiv(H, BLOCK_N), GROUP_M)
    expert = tl.load(block_experts_ptr + pid_m)
    if expert < 0:
        return
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + slots)
    row_ok = pairs < num_pairs

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + slots.to(tl.int64)[:, None] * stride_im + offs_k[None, :]
    w_base = w2_ptr + expert.to(tl.int64) * stride_we
    b_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Padding slots of `inter` hold whatever was there; as in GEMM1 they only reach their
    # own (unstored) output rows, so the loads stay unmasked along M.
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K and EVEN_N:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        elif EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = offs_k + k0 < I
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if HAS_BIAS:
        b_base = b2_ptr + expert.to(tl.int64) * stride_be
        acc += tl.load(b_base + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if WEIGHT_ON_OUTPUT:
        w = tl.load(topk_weights_ptr + pairs, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    safe_pairs = tl.where(row_ok, pairs, 0).to(tl.int64)
    out_ptrs = pair_out_ptr + safe_pairs[:, None] * stride_om + offs_n[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptrs, acc.to(pair_out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _combine_kernel(
    pair_out_ptr,  # [M*k, H]
    topk_ids_ptr,  # [M*k] int32
    out_ptr,  # [M, H], out
    H,
    num_experts,
    stride_pm,
    stride_om,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid (M, H-tiles): one token's BLOCK_H output columns, summed over its k slots."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token * TOP_K + j
        e = tl.load(topk_ids_ptr + pair)
        valid = (e >= 0) & (e < num_experts)
        row = tl.load(pair_out_ptr + pair * stride_pm + offs, mask=col_ok & valid, other=0.0)
        acc += row.to(tl.float32)
    tl.store(out_ptr + token * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=col_ok)
