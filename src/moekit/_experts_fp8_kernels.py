"""Triton kernels of the fp8 (W8A8) fused experts pipeline.

    _amax_partials_kernel   grid (P,): amax of one contiguous chunk of hidden; only for
                            dynamic per-tensor scales (the quantiser reduces the P partials)
    _quantize_rows_kernel   grid (M,): one row of hidden → fp8 and its scales (per tensor,
                            per token or per 1×g group); a pass over M×H, not M·k×H
    _gemm1_fp8_kernel       grid (blocks × I-tiles): fp8 rows gathered through the dispatch
                            plan × w13[e]ᵀ (fp8), fp32 accumulation, scales, bias,
                            activation; the tile is then quantised again — GEMM2's input —
                            with one scale per (row, g columns), or the static scale
    _gemm2_fp8_kernel       grid (blocks × H-tiles): fp8 `inter` × w2[e]ᵀ (fp8), scales,
                            bias, × router weight; writes one row per pair
    combine                 `_combine_kernel` of the bf16 pipeline, unchanged

Scales are addressed as scale[e * s_e + (n // GROUP_N) * s_n + (k // GROUP_K) * s_k]
(the expert term for weights only, the row term for activations), a stride of 0
standing for an axis its group spans, so a per-tensor scale is read by every row and
column. The host derives the strides from the `QuantSpec`. A scale constant along K
multiplies the fp32 accumulator once, after the K loop; one that varies along K (1×g
activation groups, bn×bk weight blocks) multiplies each K tile's partial product before
it is added (DeepSeek-V3's promotion), so BLOCK_K divides every K group.

Quantisation follows `moekit.quant.fp8`: scale = max(amax, AMAX_FLOOR) / FMAX and
q = fp8(clamp(x / scale, ±FMAX)), with IEEE divisions (div_rn) as in the reference, so
the fp8 values equal the reference's wherever the fp32 values quantised do.
"""

import triton
import triton.language as tl

from moekit._experts_kernels import _activate, _row_tile, _tile_coords, _weight_tile


@triton.jit
def _amax_partials_kernel(
    x_ptr,  # [numel] flat view of hidden
    partials_ptr,  # [P] fp32, out
    numel,
    chunk,  # elements per program, a multiple of BLOCK
    BLOCK: tl.constexpr,
):
    """One program: max |x| over elements [pid·chunk, (pid+1)·chunk) of the flat tensor."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * chunk
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + idx, mask=idx < numel, other=0.0)
        acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
    tl.store(partials_ptr + pid, tl.max(acc, axis=0))


@triton.jit
def _scale_from_amax(amax, FMAX: tl.constexpr, AMAX_FLOOR: tl.constexpr):
    """max(amax, AMAX_FLOOR) / FMAX, correctly rounded like the reference's division."""
    return tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), FMAX)


@triton.jit
def _tensor_scale(partials_ptr, num_partials, FMAX: tl.constexpr, AMAX_FLOOR: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    """The dynamic per-tensor scale from `_amax_partials_kernel`'s partials (BLOCK_P ≥ P)."""
    p = tl.arange(0, BLOCK_P)
    amax = tl.max(tl.load(partials_ptr + p, mask=p < num_partials, other=0.0), axis=0)
    return _scale_from_amax(amax, FMAX, AMAX_FLOOR)


@triton.jit
def _quantize(x, scale, FMAX: tl.constexpr):
    """fp32 x / scale, clamped to ±FMAX (e4m3fn has no infinity); the caller casts."""
    return tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FMAX), FMAX)


@triton.jit
def _group_scales(x, GROUP: tl.constexpr, FMAX: tl.constexpr, AMAX_FLOOR: tl.constexpr):
    """x [R, C] fp32 → (x quantised per 1×GROUP columns [R, C], scales [R, C // GROUP])."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    if C == GROUP:
        scale = _scale_from_amax(tl.max(tl.abs(x), axis=1), FMAX, AMAX_FLOOR)
        return _quantize(x, scale[:, None], FMAX), scale[:, None]
    else:
        xg = tl.reshape(x, [R, C // GROUP, GROUP])
        scale = _scale_from_amax(tl.max(tl.abs(xg), axis=2), FMAX, AMAX_FLOOR)
        return tl.reshape(_quantize(xg, scale[:, :, None], FMAX), [R, C]), scale


@triton.jit
def _quantize_rows_kernel(
    x_ptr,  # [M, K] bf16/fp16/fp32
    q_ptr,  # [M, K] fp8, out
    scale_ptr,  # "static": [1] read; "tensor": [1] out; "token": [M] out; "group": [M, nG] out
    partials_ptr,  # [num_partials] fp32 ("tensor" only)
    num_partials,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    MODE: tl.constexpr,  # "static", "tensor", "token" or "group"
    GROUP: tl.constexpr,  # the K group of "group"
    FMAX: tl.constexpr,
    AMAX_FLOOR: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of GROUP
    BLOCK_P: tl.constexpr,  # ≥ num_partials
):
    """One program: one row of x quantised, and its scales written."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    scale = 1.0
    if MODE == "static":
        scale = tl.load(scale_ptr)
    elif MODE == "tensor":
        scale = _tensor_scale(partials_ptr, num_partials, FMAX, AMAX_FLOOR, BLOCK_P)
        if row == 0:
            tl.store(scale_ptr, scale)
    elif MODE == "token":
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0)
            acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
        scale = _scale_from_amax(tl.max(acc, axis=0), FMAX, AMAX_FLOOR)
        tl.store(scale_ptr + row * stride_sm, scale)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs < K
        x = tl.load(x_row + offs, mask=k_ok, other=0.0).to(tl.float32)
        if MODE == "group":
            q, group_scale = _group_scales(x[None, :], GROUP, FMAX, AMAX_FLOOR)
            groups = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
            group_scale = tl.reshape(group_scale, [BLOCK_K // GROUP])
            tl.store(scale_ptr + row * stride_sm + groups, group_scale, mask=groups * GROUP < K)
            q = tl.reshape(q, [BLOCK_K])
        else:
            q = _quantize(x, scale, FMAX)
        tl.store(q_row + offs, q.to(q_ptr.dtype.element_ty), mask=k_ok)


@triton.jit
def _scaled_dot(acc, a, b, a_scale, b_scale, A_PER_K: tl.constexpr, B_PER_K: tl.constexpr):
    """acc + a·b, the partial product scaled first by whichever scale varies along K.

    Hopper's fp8 MMA adds into its accumulator at reduced precision (≈ 14 bits kept,
    DeepSeek-V3 §3.3.2), and Triton's default on sm_90 never promotes, so over H or I of
    several thousand the error grows with K. Every K tile's product is therefore added
    to the fp32 accumulator in full precision: explicitly where a scale varies along K,
    through max_num_imprecise_acc = BLOCK_K otherwise.
    """
    if A_PER_K and B_PER_K:
        return acc + tl.dot(a, b) * (a_scale[:, None] * b_scale[None, :])
    elif A_PER_K:
        return acc + tl.dot(a, b) * a_scale[:, None]
    elif B_PER_K:
        return acc + tl.dot(a, b) * b_scale[None, :]
    else:
        BLOCK_K: tl.constexpr = a.shape[1]
        return tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)


@triton.jit
def _gemm1_fp8_kernel(
    x_ptr,  # [M, H] fp8: hidden, quantised
    xs_ptr,  # hidden's scales: xs[token * stride_xsm + (k // X_GROUP_K) * stride_xsk]
    w13_ptr,  # [E, N1, H] fp8; N1 = 2I (gate rows, then up rows) or I (relu2)
    ws_ptr,  # w13's scales: ws[e * s_we + (n // W_GROUP_N) * s_wn + (k // W_GROUP_K) * s_wk]
    b13_ptr,  # [E, N1] (read only when HAS_BIAS)
    inter_ptr,  # [capacity, I] fp8, out
    inter_scale_ptr,  # [capacity, ceil(I / INTER_GROUP)] fp32 out; static: [1], read
    sorted_pairs_ptr,  # [capacity] int32
    block_experts_ptr,  # [capacity / BLOCK_M] int32
    num_pairs,
    num_blocks,
    H,
    I,
    top_k,
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
    INTER_STATIC: tl.constexpr,
    INTER_GROUP: tl.constexpr,  # divides BLOCK_N (dynamic)
    FMAX: tl.constexpr,
    AMAX_FLOOR: tl.constexpr,
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
    expert = expert.to(tl.int64)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + slots)
    row_ok = pairs < num_pairs
    tokens = tl.where(row_ok, pairs // top_k, 0).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :]
    w_base = w13_ptr + expert * stride_we
    g_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    u_ptrs = g_ptrs + I * stride_wn
    xs_rows = xs_ptr + tokens * stride_xsm  # [BLOCK_M]
    ws_base = ws_ptr + expert * stride_wse
    ws_gate = ws_base + (offs_n // W_GROUP_N) * stride_wsn  # [BLOCK_N]
    ws_up = ws_base + ((offs_n + I) // W_GROUP_N) * stride_wsn

    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Padding rows read token 0 (a valid row) unmasked: a dot's output row depends only on
    # its own input row (and scale), and padding rows are never stored.
    for k0 in range(0, H, BLOCK_K):
        a = _row_tile(a_ptrs, k0, offs_k, H, EVEN_K)
        g = _weight_tile(g_ptrs, None, 0, k0, col_ok, offs_k, H, EVEN_K, EVEN_N, False)
        x_scale = 1.0
        if X_PER_K:
            x_scale = tl.load(xs_rows + (k0 // X_GROUP_K) * stride_xsk)
        g_scale = 1.0
        if W_PER_K:
            g_scale = tl.load(ws_gate + (k0 // W_GROUP_K) * stride_wsk, mask=col_ok, other=0.0)
        gate = _scaled_dot(gate, a, g, x_scale, g_scale, X_PER_K, W_PER_K)
        if GATED:
            u = _weight_tile(u_ptrs, None, 0, k0, col_ok, offs_k, H, EVEN_K, EVEN_N, False)
            u_scale = 1.0
            if W_PER_K:
                u_scale = tl.load(ws_up + (k0 // W_GROUP_K) * stride_wsk, mask=col_ok,
                                  other=0.0)
            up = _scaled_dot(up, a, u, x_scale, u_scale, X_PER_K, W_PER_K)
            u_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K

    # Scales constant along K, applied once.
    if not X_PER_K:
        row_scale = tl.load(xs_rows)[:, None]
        gate = gate * row_scale
        up = up * row_scale
    if not W_PER_K:
        gate = gate * tl.load(ws_gate, mask=col_ok, other=0.0)[None, :]
        if GATED:
            up = up * tl.load(ws_up, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        b_base = b13_ptr + expert * stride_be
        gate += tl.load(b_base + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up += tl.load(b_base + I + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    result = _activate(gate, up, ACTIVATION, alpha, limit)

    # GEMM2's input, quantised here: the tile holds whole 1×INTER_GROUP groups of its rows.
    slots64 = slots.to(tl.int64)
    if INTER_STATIC:
        q = _quantize(result, tl.load(inter_scale_ptr), FMAX)
    else:
        # Columns past I (a partial last tile) must not raise a group's amax.
        result = tl.where(col_ok[None, :], result, 0.0)
        q, scale = _group_scales(result, INTER_GROUP, FMAX, AMAX_FLOOR)
        groups = pid_n * (BLOCK_N // INTER_GROUP) + tl.arange(0, BLOCK_N // INTER_GROUP)
        s_ptrs = inter_scale_ptr + slots64[:, None] * stride_ism + groups[None, :]
        tl.store(s_ptrs, scale, mask=row_ok[:, None] & (groups * INTER_GROUP < I)[None, :])
    out_ptrs = inter_ptr + slots64[:, None] * stride_im + offs_n[None, :]
    tl.store(out_ptrs, q.to(inter_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gemm2_fp8_kernel(
    inter_ptr,  # [capacity, I] fp8
    as_ptr,  # inter's scales: as[slot * stride_asm + (k // A_GROUP_K) * stride_ask]
    w2_ptr,  # [E, H, I] fp8
    ws_ptr,  # w2's scales: ws[e * s_we + (n // W_GROUP_N) * s_wn + (k // W_GROUP_K) * s_wk]
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
    stride_asm,
    stride_ask,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_wsk,
    stride_be,
    stride_om,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    A_PER_K: tl.constexpr,
    A_GROUP_K: tl.constexpr,
    W_PER_K: tl.constexpr,
    W_GROUP_N: tl.constexpr,
    W_GROUP_K: tl.constexpr,
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
    expert = expert.to(tl.int64)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + slots)
    row_ok = pairs < num_pairs
    slots64 = slots.to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + slots64[:, None] * stride_im + offs_k[None, :]
    w_base = w2_ptr + expert * stride_we
    b_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    as_rows = as_ptr + slots64 * stride_asm  # [BLOCK_M]
    ws_cols = ws_ptr + expert * stride_wse + (offs_n // W_GROUP_N) * stride_wsn  # [BLOCK_N]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Padding slots of `inter` (and of its scales) hold whatever was there; they only
    # reach their own, unstored output rows, so the loads stay unmasked along M.
    for k0 in range(0, I, BLOCK_K):
        a = _row_tile(a_ptrs, k0, offs_k, I, EVEN_K)
        b = _weight_tile(b_ptrs, None, 0, k0, col_ok, offs_k, I, EVEN_K, EVEN_N, False)
        a_scale = 1.0
        if A_PER_K:
            a_scale = tl.load(as_rows + (k0 // A_GROUP_K) * stride_ask)
        w_scale = 1.0
        if W_PER_K:
            w_scale = tl.load(ws_cols + (k0 // W_GROUP_K) * stride_wsk, mask=col_ok, other=0.0)
        acc = _scaled_dot(acc, a, b, a_scale, w_scale, A_PER_K, W_PER_K)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if not A_PER_K:
        acc = acc * tl.load(as_rows)[:, None]
    if not W_PER_K:
        acc = acc * tl.load(ws_cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        b_base = b2_ptr + expert * stride_be
        acc += tl.load(b_base + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    w = tl.load(topk_weights_ptr + pairs, mask=row_ok, other=0.0)
    acc = acc * w[:, None]
    safe_pairs = tl.where(row_ok, pairs, 0).to(tl.int64)
    out_ptrs = pair_out_ptr + safe_pairs[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(pair_out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
