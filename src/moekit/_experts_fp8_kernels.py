"""Triton kernels of the fp8 (W8A8) fused experts pipeline.

    _amax_partials_kernel   grid (P,): amax of one contiguous chunk of hidden; only for
                            dynamic per-tensor scales (the quantiser reduces the P partials)
    _quantize_rows_kernel   grid (M,): one row of hidden → fp8 and its scales (per tensor,
                            per token or per 1×g group); a pass over M×H, not M·k×H. For a
                            few rows each program reads all of them for a per-tensor amax
                            ("tensor_rows"), so no partials launch is needed
    _gemm1_fp8_kernel       grid (row tiles × I-tiles): fp8 rows gathered through the
                            dispatch plan × w13[e]ᵀ (fp8), fp32 accumulation, scales, bias,
                            activation; the tile is then quantised again — GEMM2's input —
                            with one scale per (row, g columns), or the static scale
    _gemm2_fp8_kernel       grid (row tiles × H-tiles [× K parts]), or persistent: fp8
                            `inter` × w2[e]ᵀ (fp8), scales, bias, × router weight; writes one
                            row per pair (per pair and K part where few programs would
                            otherwise stream long K loops: mixtral at decode)
    combine                 `_combine_kernel` of the bf16 pipeline (summing the K parts too)

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

Row tiles, tail tiles, TMA weight (and `inter`) tiles and the persistent GEMM2 work as in
the 16-bit pipeline (`moekit._experts_kernels`, whose tile helpers these kernels share);
only the arithmetic of a K step and the epilogues differ.
"""

import triton
import triton.language as tl

from moekit import _fp8_swap
from moekit._experts_kernels import (
    _activate,
    _aligned,
    _ordered_tile_of,
    _row_tile,
    _run_of,
    _weight_tile,
    _work_tile,
)

# GEMM1's gated tiles from this height on run as two column halves (`_gemm1_fp8_kernel`).
SPLIT_BLOCK_M = 128
# A swapped dot's promotion into fp32, every this many products (`moekit._fp8_swap`).
_PROMOTE_K = tl.constexpr(_fp8_swap.PROMOTE_K)


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
    scale_ptr,  # static: [1] read; tensor(_rows): [1] out; token: [M] out; group: [M, nG] out
    partials_ptr,  # [num_partials] fp32 ("tensor" only)
    num_partials,
    num_rows,  # M ("tensor_rows" only)
    K,
    chunk,  # values of a row per program along grid axis 1: a multiple of BLOCK_K, or ≥ K
    stride_xm,
    stride_qm,
    stride_sm,
    stride_sk,  # "group": between a row's group scales (1, or the rows' count: transposed)
    slots_ptr,  # SCATTER: int32 [M·top_k] plan slot of each pair (−1: dropped)
    top_k,
    clear_ptr,  # CLEAR: int32 [clear_n], zeroed by program (0, 0) for a later kernel
    clear_n,
    MODE: tl.constexpr,  # "static", "tensor", "tensor_rows", "token" or "group"
    SCATTER: tl.constexpr,  # write row m (and its scales) to its pairs' plan slots
    CLEAR: tl.constexpr,
    GROUP: tl.constexpr,  # the K group of "group"
    FMAX: tl.constexpr,
    AMAX_FLOOR: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of GROUP
    BLOCK_P: tl.constexpr,  # ≥ num_partials
    AMAX_ROWS: tl.constexpr,  # "tensor_rows": rows per step of the amax (a power of two)
    AMAX_WHOLE: tl.constexpr,  # "tensor_rows": [AMAX_ROWS, BLOCK_K] covers every row: one load
):
    """One program: `chunk` values of one row of x quantised, and their scales written.

    Static and 1×g group scales need nothing outside the chunk, so a long row is spread
    over several programs (a serial loop over a 14336-wide row measured 21 µs on an
    H200); a per-token or per-tensor scale is computed by a program that has the whole
    row (`chunk` ≥ K).

    With SCATTER the quantised row goes to each of its top_k pairs' plan slots instead of
    row m (q [capacity, K], per-row scales [capacity, …]): the plan-order rows a GEMM
    reads by TMA, which cannot gather (`moekit._gluon_gemm1`).

    With CLEAR, program (0, 0) also zeroes `clear_ptr`: the direct GEMM1's group counters
    (`moekit._direct_fp8_kernels._quantize_inter`), no launch of their own."""
    _quantize_rows(tl.program_id(0), tl.program_id(1), x_ptr, q_ptr, scale_ptr,
                   partials_ptr, num_partials, num_rows, K, chunk, stride_xm, stride_qm,
                   stride_sm, stride_sk, slots_ptr, top_k, clear_ptr, clear_n, MODE, SCATTER,
                   CLEAR, GROUP, FMAX, AMAX_FLOOR, BLOCK_K, BLOCK_P, AMAX_ROWS, AMAX_WHOLE)


@triton.jit
def _quantize_rows(
    row_id,
    chunk_id,
    x_ptr,  # [M, K] bf16/fp16/fp32
    q_ptr,  # [M, K] fp8, out
    scale_ptr,  # static: [1] read; tensor(_rows): [1] out; token: [M] out; group: [M, nG] out
    partials_ptr,  # [num_partials] fp32 ("tensor" only)
    num_partials,
    num_rows,  # M ("tensor_rows" only)
    K,
    chunk,  # values of a row per program along grid axis 1: a multiple of BLOCK_K, or ≥ K
    stride_xm,
    stride_qm,
    stride_sm,
    stride_sk,  # "group": between a row's group scales (1, or the rows' count: transposed)
    slots_ptr,  # SCATTER: int32 [M·top_k] plan slot of each pair (−1: dropped)
    top_k,
    clear_ptr,  # CLEAR: int32 [clear_n], zeroed by program (0, 0) for a later kernel
    clear_n,
    MODE: tl.constexpr,  # "static", "tensor", "tensor_rows", "token" or "group"
    SCATTER: tl.constexpr,  # write row m (and its scales) to its pairs' plan slots
    CLEAR: tl.constexpr,
    GROUP: tl.constexpr,  # the K group of "group"
    FMAX: tl.constexpr,
    AMAX_FLOOR: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of GROUP
    BLOCK_P: tl.constexpr,  # ≥ num_partials
    AMAX_ROWS: tl.constexpr,  # "tensor_rows": rows per step of the amax (a power of two)
    AMAX_WHOLE: tl.constexpr,  # "tensor_rows": [AMAX_ROWS, BLOCK_K] covers every row: one load
):
    """`_quantize_rows_kernel`'s work as program (row_id, chunk_id) (also a part of
    `moekit._plan_quantize_kernels._plan_quantize_kernel`)."""
    row = row_id.to(tl.int64)
    k_first = chunk_id * chunk
    if CLEAR:
        if (row == 0) & (k_first == 0):
            for c0 in range(0, clear_n, BLOCK_K):
                offs = c0 + tl.arange(0, BLOCK_K)
                tl.store(clear_ptr + offs, tl.zeros([BLOCK_K], dtype=tl.int32),
                         mask=offs < clear_n)
    x_row = x_ptr + row * stride_xm
    scale = 1.0
    if MODE == "static":
        scale = tl.load(scale_ptr)
    elif MODE == "tensor":
        scale = _tensor_scale(partials_ptr, num_partials, FMAX, AMAX_FLOOR, BLOCK_P)
        if row == 0:
            tl.store(scale_ptr, scale)
    elif MODE == "tensor_rows":  # a few rows: every program reads them all, no partials
        if AMAX_WHOLE:
            amax = _whole_amax(x_ptr, num_rows, K, stride_xm, AMAX_ROWS, BLOCK_K)
        else:
            amax = _rows_amax(x_ptr, num_rows, K, stride_xm, AMAX_ROWS, BLOCK_K)
        scale = _scale_from_amax(amax, FMAX, AMAX_FLOOR)
        if row == 0:
            tl.store(scale_ptr, scale)
    elif MODE == "token":
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0)
            acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
        scale = _scale_from_amax(tl.max(acc, axis=0), FMAX, AMAX_FLOOR)
        for j in range(0, top_k if SCATTER else 1):
            dest, ok = _dest_row(row, j, slots_ptr, top_k, SCATTER)
            tl.store(scale_ptr + dest * stride_sm, scale, mask=ok)
    for k0 in range(k_first, tl.minimum(K, k_first + chunk), BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs < K
        x = tl.load(x_row + offs, mask=k_ok, other=0.0).to(tl.float32)
        groups = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        if MODE == "group":
            q, group_scale = _group_scales(x[None, :], GROUP, FMAX, AMAX_FLOOR)
            group_scale = tl.reshape(group_scale, [BLOCK_K // GROUP])
            q = tl.reshape(q, [BLOCK_K])
        else:
            q = _quantize(x, scale, FMAX)
        q = q.to(q_ptr.dtype.element_ty)
        for j in range(0, top_k if SCATTER else 1):
            dest, ok = _dest_row(row, j, slots_ptr, top_k, SCATTER)
            tl.store(q_ptr + dest * stride_qm + offs, q, mask=k_ok & ok)
            if MODE == "group":
                tl.store(scale_ptr + dest * stride_sm + groups * stride_sk, group_scale,
                         mask=(groups * GROUP < K) & ok)


@triton.jit
def _rows_amax(x_ptr, num_rows, K, stride_xm, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """max |x| over all rows [num_rows, K] (row stride stride_xm), read as [ROWS, BLOCK_K]
    tiles: a few wide steps, not one serial BLOCK_K step per row and column block (16 at
    qwen3 M = 8; `moekit._fp8_quantize._AMAX_ROWS` has the measurements)."""
    acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    for r0 in range(0, num_rows, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :],
                        mask=(rows[:, None] < num_rows) & (cols[None, :] < K), other=0.0)
            acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
    return tl.max(tl.max(acc, axis=1), axis=0)


@triton.jit
def _whole_amax(x_ptr, num_rows, K, stride_xm, ROWS: tl.constexpr, COLS: tl.constexpr):
    """max |x| over x [num_rows ≤ ROWS, K ≤ COLS] in one load: one DRAM round trip where
    `_rows_amax` makes one per step (`moekit._fp8_quantize._WHOLE_AMAX_MAX`), reduced
    straight from the loaded values, with no accumulator tile of its own in registers."""
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :],
                mask=(rows[:, None] < num_rows) & (cols[None, :] < K), other=0.0)
    return tl.max(tl.max(tl.abs(x.to(tl.float32)), axis=1), axis=0)


@triton.jit
def _dest_row(row, j, slots_ptr, top_k, SCATTER: tl.constexpr):
    """Where the quantiser writes row `row`: itself, or with SCATTER the plan slot of its
    pair j (as int64) and whether that pair has one (dropped pairs have −1)."""
    if SCATTER:
        slot = tl.load(slots_ptr + row * top_k + j).to(tl.int64)
        return slot, slot >= 0
    else:
        return row, row >= 0


@triton.jit
def _fp8_dot(a, b, SWAP_AB: tl.constexpr):
    """a·b [M, N] of a [M, K] and b [K, N]; with SWAP_AB the same product transposed,
    bᵀ·aᵀ [N, M]: the weight tile as the MMA's row side (`moekit._fp8_swap`), its sum
    promoted into fp32 every _PROMOTE_K products (every K tile, where that is shorter)."""
    K: tl.constexpr = a.shape[1]
    if SWAP_AB:
        if _PROMOTE_K > K:
            return tl.dot(tl.trans(b), tl.trans(a), max_num_imprecise_acc=K)
        elif _PROMOTE_K > 0:
            return tl.dot(tl.trans(b), tl.trans(a), max_num_imprecise_acc=_PROMOTE_K)
        else:
            return tl.dot(tl.trans(b), tl.trans(a))
    else:
        return tl.dot(a, b)


@triton.jit
def _scaled_dot(acc, a, b, a_scale, b_scale, A_PER_K: tl.constexpr, B_PER_K: tl.constexpr,
                B_UNIFORM: tl.constexpr, SWAP_AB: tl.constexpr = False):
    """acc + a·b, each K tile's product added to `acc` in full fp32 precision.

    Hopper's fp8 MMA adds into its accumulator at reduced precision (≈ 14 bits kept,
    DeepSeek-V3 §3.3.2), and Triton's default on sm_90 never promotes: measured on an
    H100 that left 1.0–1.5e-2 relative error at the presets' K instead of 2–4e-3
    (bench/NOTES.md, fp8 prefill). So every K tile's product is computed into a fresh
    accumulator and added in fp32 — scaled first by whichever scale varies along K. (The
    same promotion through `max_num_imprecise_acc` draws ptxas's warning that it
    serialises the wgmma pipeline; the explicit add does not.)

    a_scale is [BLOCK_M, 1]; b_scale [1, BLOCK_N], or a scalar when one scale covers the
    tile's columns (B_UNIFORM). The scales are never multiplied into a [BLOCK_M, BLOCK_N]
    matrix of their own: in the MMA's layout that would cost another accumulator's
    registers. With SWAP_AB (`_fp8_dot`) acc is [BLOCK_N, BLOCK_M], and so are the scales'
    shapes: a_scale [1, BLOCK_M], b_scale [BLOCK_N, 1].
    """
    if A_PER_K and B_PER_K:
        if B_UNIFORM:
            return acc + _fp8_dot(a, b, SWAP_AB) * (a_scale * b_scale)
        else:
            return acc + _fp8_dot(a, b, SWAP_AB) * a_scale * b_scale
    elif A_PER_K:
        return acc + _fp8_dot(a, b, SWAP_AB) * a_scale
    elif B_PER_K:
        return acc + _fp8_dot(a, b, SWAP_AB) * b_scale
    else:
        return acc + _fp8_dot(a, b, SWAP_AB)


@triton.jit
def _col_scales(ptrs, first_ptr, col_ok, UNIFORM: tl.constexpr, SWAP_AB: tl.constexpr = False):
    """A weight tile's scales along N: [1, BLOCK_N] from `ptrs` ([BLOCK_N, 1] for a swapped
    product), or with UNIFORM (the tile inside one N group) the one scalar at `first_ptr`."""
    if UNIFORM:
        return tl.load(first_ptr)
    elif SWAP_AB:
        return tl.load(ptrs, mask=col_ok, other=0.0)[:, None]
    else:
        return tl.load(ptrs, mask=col_ok, other=0.0)[None, :]


@triton.jit
def _row_scale_vector(scales, SWAP_AB: tl.constexpr):
    """Per-row scales [BLOCK_M] as a product's factor: [BLOCK_M, 1], or [1, BLOCK_M] for a
    swapped product."""
    if SWAP_AB:
        return scales[None, :]
    else:
        return scales[:, None]


@triton.jit
def _gate_up(
    a_base, xs_rows, w13_ptr, w13_desc, ws_base, b13_ptr, expert, first_n, H, I, stride_xsk,
    stride_we, stride_wn, stride_wsn, stride_wsk, stride_be, alpha, limit,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, W_TMA: tl.constexpr,
    X_PER_K: tl.constexpr, X_GROUP_K: tl.constexpr, W_PER_K: tl.constexpr,
    W_GROUP_N: tl.constexpr, W_GROUP_K: tl.constexpr, W_UNIFORM_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr = False,
):
    """activation(x·gateᵀ, x·upᵀ) in fp32 for BLOCK_N columns from `first_n`, all scales
    and biases applied; columns past I are 0. `a_base` points at the gathered fp8 rows'
    first K tile [BLOCK_M, BLOCK_K]. With SWAP_AB the K loop's products are the
    transposed ones (`_fp8_dot`), turned back after it."""
    BLOCK_M: tl.constexpr = a_base.shape[0]
    offs_n = first_n + tl.arange(0, BLOCK_N)
    col_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    expert64 = expert.to(tl.int64)
    g_ptrs = (w13_ptr + expert64 * stride_we + offs_n[None, :] * stride_wn
              + offs_k[:, None])  # [BLOCK_K, BLOCK_N]
    u_ptrs = g_ptrs + I * stride_wn
    g_row = expert * (I * 2 if GATED else I) + first_n  # rows of the [E*N1, H] view
    u_row = g_row + I
    ws_gate = ws_base + (offs_n // W_GROUP_N) * stride_wsn  # [BLOCK_N]
    ws_up = ws_base + ((offs_n + I) // W_GROUP_N) * stride_wsn
    ws_gate0 = ws_base + (first_n // W_GROUP_N) * stride_wsn  # W_UNIFORM_N: all of it
    ws_up0 = ws_base + ((first_n + I) // W_GROUP_N) * stride_wsn
    a_ptrs = a_base

    if SWAP_AB:
        gate = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Padding rows read token 0 (a valid row) unmasked: a dot's output row depends only on
    # its own input row (and scale), and padding rows are never stored.
    for k0 in range(0, H, BLOCK_K):
        a = _row_tile(a_ptrs, k0, offs_k, H, EVEN_K)
        g = _weight_tile(g_ptrs, w13_desc, g_row, k0, col_ok, offs_k, H, EVEN_K, EVEN_N, W_TMA)
        x_scale = 1.0
        if X_PER_K:
            x_scale = _row_scale_vector(tl.load(xs_rows + (k0 // X_GROUP_K) * stride_xsk),
                                        SWAP_AB)
        k_step = (k0 // W_GROUP_K) * stride_wsk
        g_scale = 1.0
        if W_PER_K:
            g_scale = _col_scales(ws_gate + k_step, ws_gate0 + k_step, col_ok, W_UNIFORM_N,
                                  SWAP_AB)
        gate = _scaled_dot(gate, a, g, x_scale, g_scale, X_PER_K, W_PER_K, W_UNIFORM_N,
                           SWAP_AB)
        if GATED:
            u = _weight_tile(u_ptrs, w13_desc, u_row, k0, col_ok, offs_k, H, EVEN_K, EVEN_N,
                             W_TMA)
            u_scale = 1.0
            if W_PER_K:
                u_scale = _col_scales(ws_up + k_step, ws_up0 + k_step, col_ok, W_UNIFORM_N,
                                      SWAP_AB)
            up = _scaled_dot(up, a, u, x_scale, u_scale, X_PER_K, W_PER_K, W_UNIFORM_N,
                             SWAP_AB)
            u_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
    if SWAP_AB:
        gate = tl.trans(gate)
        up = tl.trans(up)

    # Scales constant along K, applied once.
    if not X_PER_K:
        row_scale = tl.load(xs_rows)[:, None]
        gate = gate * row_scale
        up = up * row_scale
    if not W_PER_K:
        gate = gate * _col_scales(ws_gate, ws_gate0, col_ok, W_UNIFORM_N)
        if GATED:
            up = up * _col_scales(ws_up, ws_up0, col_ok, W_UNIFORM_N)
    if HAS_BIAS:
        b_base = b13_ptr + expert64 * stride_be
        gate += tl.load(b_base + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up += tl.load(b_base + I + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # Columns past I (a partial last tile) must not raise a group's amax.
    return tl.where(col_ok[None, :], _activate(gate, up, ACTIVATION, alpha, limit), 0.0)


@triton.jit
def _store_inter(result, scale, first_n, slots64, row_ok, inter_ptr, inter_scale_ptr, I,
                 stride_im, stride_ism, INTER_STATIC: tl.constexpr, INTER_GROUP: tl.constexpr,
                 SHARED_SCALE: tl.constexpr, FMAX: tl.constexpr, AMAX_FLOOR: tl.constexpr):
    """GEMM2's input: `result` [BLOCK_M, C] (C columns from `first_n`) quantised and stored
    with its scales — the static one, its own 1×INTER_GROUP groups, or with SHARED_SCALE
    the given [BLOCK_M, 1] scale of a group this run of columns is half of (stored by the
    caller)."""
    C: tl.constexpr = result.shape[1]
    offs_n = first_n + tl.arange(0, C)
    if INTER_STATIC:
        q = _quantize(result, tl.load(inter_scale_ptr), FMAX)
    elif SHARED_SCALE:
        q = _quantize(result, scale, FMAX)
    else:
        q, scales = _group_scales(result, INTER_GROUP, FMAX, AMAX_FLOOR)
        groups = first_n // INTER_GROUP + tl.arange(0, C // INTER_GROUP)
        s_ptrs = inter_scale_ptr + slots64[:, None] * stride_ism + groups[None, :]
        tl.store(s_ptrs, scales, mask=row_ok[:, None] & (groups * INTER_GROUP < I)[None, :])
    out_ptrs = inter_ptr + slots64[:, None] * stride_im + offs_n[None, :]
    tl.store(out_ptrs, q.to(inter_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_n < I)[None, :])


@triton.jit
def _gemm1_fp8_tile(
    x_ptr, xs_ptr, w13_ptr, w13_desc, ws_ptr, b13_ptr, inter_ptr, inter_scale_ptr,
    sorted_pairs_ptr, first_slot, expert, pid_n, num_pairs, H, I, top_k,
    stride_xm, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wse, stride_wsn,
    stride_wsk, stride_be, stride_im, stride_ism, alpha, limit,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, W_TMA: tl.constexpr,
    X_PER_K: tl.constexpr, X_GROUP_K: tl.constexpr, W_PER_K: tl.constexpr,
    W_GROUP_N: tl.constexpr, W_GROUP_K: tl.constexpr, W_UNIFORM_N: tl.constexpr,
    INTER_STATIC: tl.constexpr, INTER_GROUP: tl.constexpr, SPLIT_N: tl.constexpr,
    FMAX: tl.constexpr, AMAX_FLOOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """BLOCK_M plan slots from `first_slot` (one expert) × BLOCK_N intermediate columns,
    written to `inter` in plan-slot order (`_gemm1_fp8_rows`)."""
    slots = first_slot + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + slots)
    _gemm1_fp8_rows(
        x_ptr, xs_ptr, w13_ptr, w13_desc, ws_ptr, b13_ptr, inter_ptr, inter_scale_ptr, pairs,
        pairs < num_pairs, slots.to(tl.int64), expert, pid_n, H, I, top_k, stride_xm,
        stride_xsm, stride_xsk, stride_we, stride_wn, stride_wse, stride_wsn, stride_wsk,
        stride_be, stride_im, stride_ism, alpha, limit, ACTIVATION, GATED, HAS_BIAS, EVEN_K,
        EVEN_N, W_TMA, X_PER_K, X_GROUP_K, W_PER_K, W_GROUP_N, W_GROUP_K, W_UNIFORM_N,
        INTER_STATIC, INTER_GROUP, SPLIT_N, FMAX, AMAX_FLOOR, BLOCK_M, BLOCK_N, BLOCK_K,
        SWAP_AB,
    )


@triton.jit
def _gemm1_fp8_rows(
    x_ptr, xs_ptr, w13_ptr, w13_desc, ws_ptr, b13_ptr, inter_ptr, inter_scale_ptr, pairs,
    row_ok, slots64, expert, pid_n, H, I, top_k,
    stride_xm, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wse, stride_wsn,
    stride_wsk, stride_be, stride_im, stride_ism, alpha, limit,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, W_TMA: tl.constexpr,
    X_PER_K: tl.constexpr, X_GROUP_K: tl.constexpr, W_PER_K: tl.constexpr,
    W_GROUP_N: tl.constexpr, W_GROUP_K: tl.constexpr, W_UNIFORM_N: tl.constexpr,
    INTER_STATIC: tl.constexpr, INTER_GROUP: tl.constexpr, SPLIT_N: tl.constexpr,
    FMAX: tl.constexpr, AMAX_FLOOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """The BLOCK_M pairs `pairs` of one expert (those not `row_ok` are padding: never
    stored) × BLOCK_N intermediate columns, each row stored with its scales to row
    `slots64` (int64) of `inter`: its plan slot (`_gemm1_fp8_tile`).
    With SPLIT_N as two column halves, one K loop each (see `_gemm1_fp8_kernel`); with
    SWAP_AB the products transposed (`_fp8_dot`)."""
    tokens = tl.where(row_ok, pairs // top_k, 0).to(tl.int64)
    a_base = x_ptr + tokens[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    xs_rows = xs_ptr + tokens * stride_xsm  # [BLOCK_M]
    ws_base = ws_ptr + expert.to(tl.int64) * stride_wse
    if SPLIT_N:
        HALF: tl.constexpr = BLOCK_N // 2
        n0 = pid_n * BLOCK_N
        first = _gate_up(
            a_base, xs_rows, w13_ptr, w13_desc, ws_base, b13_ptr, expert, n0, H, I,
            stride_xsk, stride_we, stride_wn, stride_wsn, stride_wsk, stride_be, alpha, limit,
            ACTIVATION, GATED, HAS_BIAS, EVEN_K, EVEN_N, W_TMA, X_PER_K, X_GROUP_K, W_PER_K,
            W_GROUP_N, W_GROUP_K, W_UNIFORM_N, HALF, BLOCK_K, SWAP_AB,
        )
        second = _gate_up(
            a_base, xs_rows, w13_ptr, w13_desc, ws_base, b13_ptr, expert, n0 + HALF, H, I,
            stride_xsk, stride_we, stride_wn, stride_wsn, stride_wsk, stride_be, alpha, limit,
            ACTIVATION, GATED, HAS_BIAS, EVEN_K, EVEN_N, W_TMA, X_PER_K, X_GROUP_K, W_PER_K,
            W_GROUP_N, W_GROUP_K, W_UNIFORM_N, HALF, BLOCK_K, SWAP_AB,
        )
        shared: tl.constexpr = not INTER_STATIC and INTER_GROUP == BLOCK_N
        scale = 1.0
        if shared:  # one group spans both halves: its amax over both
            amax = tl.maximum(tl.max(tl.abs(first), axis=1), tl.max(tl.abs(second), axis=1))
            scale = _scale_from_amax(amax, FMAX, AMAX_FLOOR)
            tl.store(inter_scale_ptr + slots64 * stride_ism + pid_n, scale, mask=row_ok)
            scale = scale[:, None]
        _store_inter(first, scale, n0, slots64, row_ok, inter_ptr, inter_scale_ptr, I,
                     stride_im, stride_ism, INTER_STATIC, INTER_GROUP, shared, FMAX,
                     AMAX_FLOOR)
        _store_inter(second, scale, n0 + HALF, slots64, row_ok, inter_ptr,
                     inter_scale_ptr, I, stride_im, stride_ism, INTER_STATIC, INTER_GROUP,
                     shared, FMAX, AMAX_FLOOR)
    else:
        result = _gate_up(
            a_base, xs_rows, w13_ptr, w13_desc, ws_base, b13_ptr, expert, pid_n * BLOCK_N, H, I,
            stride_xsk, stride_we, stride_wn, stride_wsn, stride_wsk, stride_be, alpha, limit,
            ACTIVATION, GATED, HAS_BIAS, EVEN_K, EVEN_N, W_TMA, X_PER_K, X_GROUP_K, W_PER_K,
            W_GROUP_N, W_GROUP_K, W_UNIFORM_N, BLOCK_N, BLOCK_K, SWAP_AB,
        )
        _store_inter(result, 1.0, pid_n * BLOCK_N, slots64, row_ok, inter_ptr, inter_scale_ptr, I,
                     stride_im, stride_ism, INTER_STATIC, INTER_GROUP, False, FMAX,
                     AMAX_FLOOR)


@triton.jit
def _gemm1_fp8_kernel(
    x_ptr,  # [M, H] fp8: hidden, quantised
    xs_ptr,  # hidden's scales: xs[token * stride_xsm + (k // X_GROUP_K) * stride_xsk]
    w13_ptr,  # [E, N1, H] fp8; N1 = 2I (gate rows, then up rows) or I (relu2)
    w13_desc,  # TMA descriptor of w13 as [E*N1, H] (used only when W_TMA)
    ws_ptr,  # w13's scales: ws[e * s_we + (n // W_GROUP_N) * s_wn + (k // W_GROUP_K) * s_wk]
    b13_ptr,  # [E, N1] (read only when HAS_BIAS)
    inter_ptr,  # [capacity, I] fp8, out
    inter_scale_ptr,  # [capacity, ceil(I / INTER_GROUP)] fp32 out; static: [1], read
    sorted_pairs_ptr,  # [capacity] int32
    block_experts_ptr,  # [capacity / plan rows] int32
    tiles_ptr,  # [num_blocks + 1] int32 work list (read only when TAIL_M)
    expert_offsets_ptr,  # [E + 1] int32 (read only when EXPERT_GROUPS or PERSISTENT)
    num_experts,
    num_pairs,
    num_blocks,  # row tiles of the grid: plan blocks, or the work list's length
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
    W_TMA: tl.constexpr,
    X_PER_K: tl.constexpr,
    X_GROUP_K: tl.constexpr,
    W_PER_K: tl.constexpr,
    W_GROUP_N: tl.constexpr,
    W_GROUP_K: tl.constexpr,
    W_UNIFORM_N: tl.constexpr,  # the column tile lies inside one scale group of N
    INTER_STATIC: tl.constexpr,
    INTER_GROUP: tl.constexpr,  # divides BLOCK_N (dynamic)
    SPLIT_N: tl.constexpr,  # two column halves, one K loop each (below)
    FMAX: tl.constexpr,
    AMAX_FLOOR: tl.constexpr,
    TAIL_M: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # divides H, I and the row strides (`_aligned`)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EXPERT_GROUPS: tl.constexpr,  # `_expert_tile_of`'s order, not `_tile_of`'s
    SWAP_AB: tl.constexpr,  # the K loop's products transposed (`moekit._fp8_swap`)
    PERSISTENT: tl.constexpr = False,  # `moekit._persistent_gemm1` (no tail tiles)
    FLATTEN: tl.constexpr = False,
):
    """One program: one row tile (one expert) × BLOCK_N intermediate columns; a tail tile
    (TAIL_M) computes only its TAIL_M rows. PERSISTENT: each program a contiguous run of
    the tiles (`_run_of`).

    Every K step keeps two fp32 accumulators per product (the promoted sum and the MMA's
    partial, or the partial a per-K scale multiplies), and GEMM1 has two products (gate
    and up): at 128 × 128 that is 256 registers per thread, which spill. SPLIT_N computes
    the tile as two column halves, one K loop each (the gathered rows are read twice,
    from L2), so GEMM2's input is still quantised in whole 1×128 groups of a row. A tail
    tile splits too: the TMA descriptor's boxes are half a column tile wide.
    """
    H = _aligned(H, ROW_ALIGN)
    I = _aligned(I, ROW_ALIGN)
    stride_xm = _aligned(stride_xm, ROW_ALIGN)
    stride_we = _aligned(stride_we, ROW_ALIGN)
    stride_wn = _aligned(stride_wn, ROW_ALIGN)
    stride_im = _aligned(stride_im, ROW_ALIGN)
    if PERSISTENT:
        tl.static_assert(TAIL_M == 0, "persistent GEMM1 programs take no tail tiles")
        num_n = tl.cdiv(I, BLOCK_N)
        used, first, last = _run_of(expert_offsets_ptr, num_experts, num_n, BLOCK_M)
        for tile in tl.range(first, last, flatten=FLATTEN):
            pid_m, pid_n = _ordered_tile_of(tile, used, num_n, tiles_ptr, block_experts_ptr,
                                            expert_offsets_ptr, GROUP_M, EXPERT_GROUPS, 0,
                                            BLOCK_M)
            first_slot, expert, _ = _work_tile(tiles_ptr, block_experts_ptr, pid_m, BLOCK_M, 0)
            _gemm1_fp8_tile(
                x_ptr, xs_ptr, w13_ptr, w13_desc, ws_ptr, b13_ptr, inter_ptr, inter_scale_ptr,
                sorted_pairs_ptr, first_slot, expert, pid_n, num_pairs, H, I, top_k,
                stride_xm, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wse,
                stride_wsn, stride_wsk, stride_be, stride_im, stride_ism, alpha, limit,
                ACTIVATION, GATED, HAS_BIAS, EVEN_K, EVEN_N, W_TMA, X_PER_K, X_GROUP_K,
                W_PER_K, W_GROUP_N, W_GROUP_K, W_UNIFORM_N, INTER_STATIC, INTER_GROUP,
                SPLIT_N, FMAX, AMAX_FLOOR, BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB,
            )
        return
    pid_m, pid_n = _ordered_tile_of(tl.program_id(0), num_blocks, tl.cdiv(I, BLOCK_N), tiles_ptr,
                                    block_experts_ptr, expert_offsets_ptr, GROUP_M,
                                    EXPERT_GROUPS, TAIL_M, BLOCK_M)
    first_slot, expert, is_tail = _work_tile(tiles_ptr, block_experts_ptr, pid_m, BLOCK_M,
                                             TAIL_M)
    if expert < 0:
        return
    # The same tile code at two heights; a constexpr TAIL_M = 0 compiles only the second.
    if TAIL_M and is_tail:
        _gemm1_fp8_tile(
            x_ptr, xs_ptr, w13_ptr, w13_desc, ws_ptr, b13_ptr, inter_ptr, inter_scale_ptr,
            sorted_pairs_ptr, first_slot, expert, pid_n, num_pairs, H, I, top_k,
            stride_xm, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wse, stride_wsn,
            stride_wsk, stride_be, stride_im, stride_ism, alpha, limit, ACTIVATION, GATED,
            HAS_BIAS, EVEN_K, EVEN_N, W_TMA, X_PER_K, X_GROUP_K, W_PER_K, W_GROUP_N,
            W_GROUP_K, W_UNIFORM_N, INTER_STATIC, INTER_GROUP, SPLIT_N, FMAX, AMAX_FLOOR, TAIL_M,
            BLOCK_N, BLOCK_K, SWAP_AB,
        )
    else:
        _gemm1_fp8_tile(
            x_ptr, xs_ptr, w13_ptr, w13_desc, ws_ptr, b13_ptr, inter_ptr, inter_scale_ptr,
            sorted_pairs_ptr, first_slot, expert, pid_n, num_pairs, H, I, top_k,
            stride_xm, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wse, stride_wsn,
            stride_wsk, stride_be, stride_im, stride_ism, alpha, limit, ACTIVATION, GATED,
            HAS_BIAS, EVEN_K, EVEN_N, W_TMA, X_PER_K, X_GROUP_K, W_PER_K, W_GROUP_N,
            W_GROUP_K, W_UNIFORM_N, INTER_STATIC, INTER_GROUP, SPLIT_N, FMAX, AMAX_FLOOR, BLOCK_M,
            BLOCK_N, BLOCK_K, SWAP_AB,
        )


@triton.jit
def _row_scales(ptrs, rows, MASK_ROWS: tl.constexpr):
    """Per-row scales [BLOCK_M]; with MASK_ROWS only the first `rows` are read (a tail
    tile at full height may reach past the plan's last slot)."""
    if MASK_ROWS:
        BLOCK_M: tl.constexpr = ptrs.shape[0]
        return tl.load(ptrs, mask=tl.arange(0, BLOCK_M) < rows, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _gemm2_fp8_tile(
    inter_ptr, inter_desc, as_ptr, w2_ptr, w2_desc, ws_ptr, b2_ptr, topk_weights_ptr,
    pair_out_ptr, sorted_pairs_ptr, expert, first_slot, rows, pid_n, part, num_pairs, H, I,
    stride_im, stride_asm, stride_ask, stride_we, stride_wn, stride_wse, stride_wsn,
    stride_wsk, stride_be, stride_om, stride_op,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, TMA: tl.constexpr,
    A_PER_K: tl.constexpr, A_GROUP_K: tl.constexpr,
    W_PER_K: tl.constexpr, W_GROUP_N: tl.constexpr, W_GROUP_K: tl.constexpr,
    W_UNIFORM_N: tl.constexpr,
    MASK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr, K_PARTS: tl.constexpr,
):
    """BLOCK_M plan slots of `expert` from `first_slot` × BLOCK_N hidden columns, written to
    their pairs' rows; `inter_desc` (TMA) has BLOCK_M-row boxes. With MASK_ROWS only the
    first `rows` slots are the tile's (TMA only: the descriptor bounds the other loads).
    With SWAP_AB the K loop's products are transposed (`_fp8_dot`). With K_PARTS > 1 the
    tile sums only part `part` of I's K steps (an equal share; the last parts may have
    none, and store zeros) into its pairs' rows of partial sums `part` (`stride_op`
    apart); the bias goes to part 0's."""
    expert64 = expert.to(tl.int64)
    slots = first_slot + tl.arange(0, BLOCK_M)
    offs_n, col_ok, a_ptrs, b_ptrs, w_row, as_rows, ws_cols, ws_cols0 = _gemm2_fp8_operands(
        inter_ptr, as_ptr, w2_ptr, ws_ptr, expert, expert64, slots.to(tl.int64), pid_n, H,
        stride_im,
        stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, W_GROUP_N, BLOCK_N, BLOCK_K)
    acc = _gemm2_fp8_sums(
        a_ptrs, inter_desc, b_ptrs, w2_desc, w_row, as_rows, ws_cols, ws_cols0, col_ok,
        first_slot, rows, part, I, stride_ask, stride_wsk, EVEN_K, EVEN_N, TMA, A_PER_K,
        A_GROUP_K, W_PER_K, W_GROUP_K, W_UNIFORM_N, MASK_ROWS, BLOCK_M, BLOCK_N, BLOCK_K,
        SWAP_AB, K_PARTS,
    )
    if MASK_ROWS:
        pairs = tl.load(sorted_pairs_ptr + slots, mask=tl.arange(0, BLOCK_M) < rows,
                        other=num_pairs)
    else:
        pairs = tl.load(sorted_pairs_ptr + slots)
    _gemm2_fp8_store(
        acc, as_rows, ws_cols, ws_cols0, b2_ptr, topk_weights_ptr, pair_out_ptr, expert64,
        pairs, pairs < num_pairs, offs_n, col_ok, rows, part, stride_be, stride_om, stride_op,
        HAS_BIAS, A_PER_K, W_PER_K, W_UNIFORM_N, MASK_ROWS, K_PARTS,
    )


@triton.jit
def _gemm2_fp8_operands(inter_ptr, as_ptr, w2_ptr, ws_ptr, expert, expert64, slots64, pid_n,
                        H, stride_im, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn,
                        W_GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Where GEMM2's tile reads: `inter` rows `slots64` (int64) and their scales, column
    tile `pid_n` of w2[expert] and its scales. Returns (offs_n, col_ok, a_ptrs, b_ptrs
    [BLOCK_K, BLOCK_N], w_row of the [E*H, I] view, as_rows, ws_cols, ws_cols0 — the
    first column's scales, all of them where W_UNIFORM_N); `expert64` is `expert` as int64."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + slots64[:, None] * stride_im + offs_k[None, :]
    w_base = w2_ptr + expert64 * stride_we
    b_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None]
    w_row = expert * H + pid_n * BLOCK_N
    as_rows = as_ptr + slots64 * stride_asm
    ws_base = ws_ptr + expert64 * stride_wse
    ws_cols = ws_base + (offs_n // W_GROUP_N) * stride_wsn
    ws_cols0 = ws_base + (pid_n * BLOCK_N // W_GROUP_N) * stride_wsn
    return offs_n, col_ok, a_ptrs, b_ptrs, w_row, as_rows, ws_cols, ws_cols0


@triton.jit
def _gemm2_fp8_sums(
    a_ptrs, inter_desc, b_ptrs, w2_desc, w_row, as_rows, ws_cols, ws_cols0, col_ok, first_slot,
    rows, part, I, stride_ask, stride_wsk,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, TMA: tl.constexpr,
    A_PER_K: tl.constexpr, A_GROUP_K: tl.constexpr, W_PER_K: tl.constexpr,
    W_GROUP_K: tl.constexpr, W_UNIFORM_N: tl.constexpr,
    MASK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr, K_PARTS: tl.constexpr,
):
    """GEMM2's K loop over `_gemm2_fp8_operands`' tiles (with TMA `inter`'s BLOCK_M rows
    from `first_slot`): float32 [BLOCK_M, BLOCK_N] sums, the scales that vary along K
    applied (the others by `_gemm2_fp8_store`)."""
    offs_k = tl.arange(0, BLOCK_K)
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = 0
    k_hi = I
    if K_PARTS > 1:
        per_part = tl.cdiv(tl.cdiv(I, BLOCK_K), K_PARTS) * BLOCK_K
        k_lo = part * per_part
        k_hi = tl.minimum(I, k_lo + per_part)
        a_ptrs += k_lo
        b_ptrs += k_lo
    # Padding slots of `inter` (and of its scales) hold whatever was there; they only
    # reach their own, unstored output rows, so the loads stay unmasked along M.
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if TMA:
            a = inter_desc.load([first_slot, k0])
        else:
            a = _row_tile(a_ptrs, k0, offs_k, I, EVEN_K)
        b = _weight_tile(b_ptrs, w2_desc, w_row, k0, col_ok, offs_k, I, EVEN_K, EVEN_N, TMA)
        a_scale = 1.0
        if A_PER_K:
            a_scale = _row_scale_vector(
                _row_scales(as_rows + (k0 // A_GROUP_K) * stride_ask, rows, MASK_ROWS),
                SWAP_AB)
        w_scale = 1.0
        if W_PER_K:
            k_step = (k0 // W_GROUP_K) * stride_wsk
            w_scale = _col_scales(ws_cols + k_step, ws_cols0 + k_step, col_ok, W_UNIFORM_N,
                                  SWAP_AB)
        acc = _scaled_dot(acc, a, b, a_scale, w_scale, A_PER_K, W_PER_K, W_UNIFORM_N, SWAP_AB)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if SWAP_AB:
        acc = tl.trans(acc)
    return acc


@triton.jit
def _gemm2_fp8_store(
    acc, as_rows, ws_cols, ws_cols0, b2_ptr, topk_weights_ptr, pair_out_ptr, expert64, pairs,
    row_ok, offs_n, col_ok, rows, part, stride_be, stride_om, stride_op,
    HAS_BIAS: tl.constexpr, A_PER_K: tl.constexpr, W_PER_K: tl.constexpr,
    W_UNIFORM_N: tl.constexpr, MASK_ROWS: tl.constexpr, K_PARTS: tl.constexpr,
):
    """GEMM2's epilogue on `_gemm2_fp8_sums`' sums: the scales constant along K, +
    b2[expert] (`expert64`, int64), × each pair's router weight, each row stored to its
    pair's row of `pair_out` (rows not `row_ok` are padding)."""
    if not A_PER_K:
        acc = acc * _row_scales(as_rows, rows, MASK_ROWS)[:, None]
    if not W_PER_K:
        acc = acc * _col_scales(ws_cols, ws_cols0, col_ok, W_UNIFORM_N)
    if HAS_BIAS:
        b_base = b2_ptr + expert64 * stride_be
        bias_ok = col_ok
        if K_PARTS > 1:
            bias_ok = col_ok & (part == 0)
        acc += tl.load(b_base + offs_n, mask=bias_ok, other=0.0).to(tl.float32)[None, :]
    w = tl.load(topk_weights_ptr + pairs, mask=row_ok, other=0.0)
    acc = acc * w[:, None]
    safe_pairs = tl.where(row_ok, pairs, 0).to(tl.int64)
    out_ptrs = pair_out_ptr + safe_pairs[:, None] * stride_om + offs_n[None, :]
    if K_PARTS > 1:
        out_ptrs += part.to(tl.int64) * stride_op
    tl.store(out_ptrs, acc.to(pair_out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gemm2_fp8_work_tile(
    inter_ptr, inter_desc, as_ptr, w2_ptr, w2_desc, ws_ptr, b2_ptr, topk_weights_ptr,
    pair_out_ptr, sorted_pairs_ptr, block_experts_ptr, tiles_ptr, pid_m, pid_n, part,
    num_pairs, H, I, stride_im, stride_asm, stride_ask, stride_we, stride_wn, stride_wse,
    stride_wsn, stride_wsk, stride_be, stride_om, stride_op,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, TMA: tl.constexpr,
    A_PER_K: tl.constexpr, A_GROUP_K: tl.constexpr,
    W_PER_K: tl.constexpr, W_GROUP_N: tl.constexpr, W_GROUP_K: tl.constexpr,
    W_UNIFORM_N: tl.constexpr,
    TAIL_M: tl.constexpr, PERSISTENT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
    K_PARTS: tl.constexpr,
):
    """Row tile `pid_m` (`_work_tile`) × column tile `pid_n`, with the tail handling of
    the 16-bit pipeline's `_gemm2_work_tile`: full height with masked rows in the
    persistent loop, TAIL_M rows by pointer elsewhere."""
    first_slot, expert, is_tail = _work_tile(tiles_ptr, block_experts_ptr, pid_m, BLOCK_M,
                                             TAIL_M)
    if PERSISTENT or expert >= 0:
        if TAIL_M and PERSISTENT:
            tl.static_assert(TMA, "the persistent loop reads inter through TMA")
            rows = tl.where(is_tail, TAIL_M, BLOCK_M)
            _gemm2_fp8_tile(
                inter_ptr, inter_desc, as_ptr, w2_ptr, w2_desc, ws_ptr, b2_ptr,
                topk_weights_ptr, pair_out_ptr, sorted_pairs_ptr, expert, first_slot, rows,
                pid_n, part, num_pairs, H, I, stride_im, stride_asm, stride_ask, stride_we,
                stride_wn, stride_wse, stride_wsn, stride_wsk, stride_be, stride_om, stride_op,
                HAS_BIAS,
                EVEN_K, EVEN_N, TMA, A_PER_K, A_GROUP_K, W_PER_K, W_GROUP_N,
                W_GROUP_K, W_UNIFORM_N, True, BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, K_PARTS,
            )
        elif TAIL_M and is_tail:
            _gemm2_fp8_tile(
                inter_ptr, inter_desc, as_ptr, w2_ptr, w2_desc, ws_ptr, b2_ptr,
                topk_weights_ptr, pair_out_ptr, sorted_pairs_ptr, expert, first_slot, TAIL_M,
                pid_n, part, num_pairs, H, I, stride_im, stride_asm, stride_ask, stride_we,
                stride_wn, stride_wse, stride_wsn, stride_wsk, stride_be, stride_om, stride_op,
                HAS_BIAS,
                EVEN_K, EVEN_N, False, A_PER_K, A_GROUP_K, W_PER_K, W_GROUP_N,
                W_GROUP_K, W_UNIFORM_N, False, TAIL_M, BLOCK_N, BLOCK_K, SWAP_AB, K_PARTS,
            )
        else:
            _gemm2_fp8_tile(
                inter_ptr, inter_desc, as_ptr, w2_ptr, w2_desc, ws_ptr, b2_ptr,
                topk_weights_ptr, pair_out_ptr, sorted_pairs_ptr, expert, first_slot, BLOCK_M,
                pid_n, part, num_pairs, H, I, stride_im, stride_asm, stride_ask, stride_we,
                stride_wn, stride_wse, stride_wsn, stride_wsk, stride_be, stride_om, stride_op,
                HAS_BIAS,
                EVEN_K, EVEN_N, TMA, A_PER_K, A_GROUP_K, W_PER_K, W_GROUP_N,
                W_GROUP_K, W_UNIFORM_N, False, BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, K_PARTS,
            )


@triton.jit
def _gemm2_fp8_kernel(
    inter_ptr,  # [capacity, I] fp8
    inter_desc,  # TMA descriptor of inter, BLOCK_M-row boxes (used only when TMA)
    as_ptr,  # inter's scales: as[slot * stride_asm + (k // A_GROUP_K) * stride_ask]
    w2_ptr,  # [E, H, I] fp8
    w2_desc,  # TMA descriptor of w2 as [E*H, I] (used only when TMA)
    ws_ptr,  # w2's scales: ws[e * s_we + (n // W_GROUP_N) * s_wn + (k // W_GROUP_K) * s_wk]
    b2_ptr,  # [E, H] (read only when HAS_BIAS)
    topk_weights_ptr,  # [M*k] fp32
    pair_out_ptr,  # [M*k, H], out; with K_PARTS > 1 [K_PARTS, M*k, H] float32 partial sums
    sorted_pairs_ptr,  # [capacity] int32
    block_experts_ptr,  # [capacity / plan rows] int32
    expert_offsets_ptr,  # [E + 1] int32 (read only when PERSISTENT)
    tiles_ptr,  # [num_blocks + 1] int32 work list, then its length (read only when TAIL_M)
    num_experts,
    num_pairs,
    num_blocks,  # row tiles of the grid: plan blocks, or the work list's length
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
    stride_op,  # between pair_out's parts (read only when K_PARTS > 1)
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    TMA: tl.constexpr,
    PERSISTENT: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    A_PER_K: tl.constexpr,
    A_GROUP_K: tl.constexpr,
    W_PER_K: tl.constexpr,
    W_GROUP_N: tl.constexpr,
    W_GROUP_K: tl.constexpr,
    W_UNIFORM_N: tl.constexpr,  # the column tile lies inside one scale group of N
    TAIL_M: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # divides H, I and the row strides (`_aligned`)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EXPERT_GROUPS: tl.constexpr,  # `_expert_tile_of`'s order, not `_tile_of`'s
    SWAP_AB: tl.constexpr,  # the K loop's products transposed (`moekit._fp8_swap`)
    K_PARTS: tl.constexpr,  # grid axis 1: K's parts (`moekit.tuning.heuristic.gemm2_k_parts`)
):
    """Row tiles (one expert each) × BLOCK_N hidden columns: one tile per program, or
    (PERSISTENT) NUM_PROGRAMS programs striding over the row tiles in use, counted on the
    GPU, as in the 16-bit pipeline's `_gemm2_kernel`. Without PERSISTENT a tile's K loop
    may be split over K_PARTS programs (grid axis 1), each storing its own partial sums."""
    H = _aligned(H, ROW_ALIGN)
    I = _aligned(I, ROW_ALIGN)
    stride_im = _aligned(stride_im, ROW_ALIGN)
    stride_we = _aligned(stride_we, ROW_ALIGN)
    stride_wn = _aligned(stride_wn, ROW_ALIGN)
    stride_om = _aligned(stride_om, ROW_ALIGN)
    num_n = tl.cdiv(H, BLOCK_N)
    if PERSISTENT:
        tl.static_assert(K_PARTS == 1, "the persistent loop runs whole K loops")
        if TAIL_M:
            used = tl.load(tiles_ptr + num_blocks)
        else:
            used = tl.load(expert_offsets_ptr + num_experts) // BLOCK_M
        for tile in tl.range(tl.program_id(0), used * num_n, NUM_PROGRAMS, flatten=True):
            pid_m, pid_n = _ordered_tile_of(tile, used, num_n, tiles_ptr, block_experts_ptr,
                                            expert_offsets_ptr, GROUP_M, EXPERT_GROUPS, TAIL_M,
                                            BLOCK_M)
            _gemm2_fp8_work_tile(
                inter_ptr, inter_desc, as_ptr, w2_ptr, w2_desc, ws_ptr, b2_ptr,
                topk_weights_ptr, pair_out_ptr, sorted_pairs_ptr, block_experts_ptr, tiles_ptr,
                pid_m, pid_n, 0, num_pairs, H, I, stride_im, stride_asm, stride_ask,
                stride_we, stride_wn, stride_wse, stride_wsn, stride_wsk, stride_be, stride_om,
                stride_op, HAS_BIAS, EVEN_K, EVEN_N, TMA, A_PER_K, A_GROUP_K, W_PER_K,
                W_GROUP_N, W_GROUP_K, W_UNIFORM_N, TAIL_M, True, BLOCK_M, BLOCK_N, BLOCK_K,
                SWAP_AB, 1,
            )
    else:
        pid_m, pid_n = _ordered_tile_of(tl.program_id(0), num_blocks, num_n, tiles_ptr,
                                        block_experts_ptr, expert_offsets_ptr, GROUP_M,
                                        EXPERT_GROUPS, TAIL_M, BLOCK_M)
        part = 0
        if K_PARTS > 1:
            part = tl.program_id(1)
        _gemm2_fp8_work_tile(
            inter_ptr, inter_desc, as_ptr, w2_ptr, w2_desc, ws_ptr, b2_ptr, topk_weights_ptr,
            pair_out_ptr, sorted_pairs_ptr, block_experts_ptr, tiles_ptr, pid_m, pid_n, part,
            num_pairs, H, I, stride_im, stride_asm, stride_ask, stride_we, stride_wn,
            stride_wse, stride_wsn, stride_wsk, stride_be, stride_om, stride_op, HAS_BIAS,
            EVEN_K, EVEN_N, TMA, A_PER_K, A_GROUP_K, W_PER_K, W_GROUP_N, W_GROUP_K,
            W_UNIFORM_N, TAIL_M, False, BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, K_PARTS,
        )
