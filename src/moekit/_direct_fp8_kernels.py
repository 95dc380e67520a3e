"""Triton kernels of the fp8 direct (plan-free) experts path, for a handful of tokens.

    _direct_gemm1_fp8_kernel  grid (M*k pairs, I-tiles): the pair's token row, quantised
                              here per the scheme, × w13[e]ᵀ (fp8), scales, bias,
                              activation; writes `inter` [M*k, I] in float32
    _direct_gemm2_fp8_kernel  grid (M, H-tiles): each K tile of a slot's `inter` row
                              quantised here (1×g groups or the static scale) × w2[e]ᵀ
                              (fp8), scales, bias, × router weight, Σ over the k slots in
                              order into `out` [M, H]

The 16-bit direct path (`moekit._direct_kernels`) with the fp8 formats of
`moekit._experts_fp8_kernels`: the same one-real-row tensor-core tiles, ids read
straight from `topk_ids`, and the combine fused into GEMM2 in slot order (deterministic).
What the plan path does in separate passes happens inside the two GEMMs:

- GEMM1's input. The plan path quantises hidden once (a pass over M×H before the GEMM,
  two with a dynamic per-tensor scale). Here every program quantises the K tiles of its
  one token row as it reads them: a 1×g group's scale comes from the tile itself, a
  per-token scale from one read of the row before the K loop, a per-tensor one from a
  read of all M rows (a few at decode). The row is a few KB against the program's tens
  of KB of weights, so the redone work is small, and the layer loses one or two launches.
- GEMM2's input. The plan path quantises it in GEMM1's epilogue, whose column tile must
  then hold whole 1×128 groups: at one row per program that is too few programs to
  stream the weights. Here GEMM1 stores the activation's output in float32 (M·k rows of
  I, a few KB) and GEMM2 quantises each 1×g group as it reads it, from the same float32
  values the reference quantises, so the fp8 values are the same.

Every K tile's product is added to the float32 accumulator on its own (promotion, see
`_scaled_dot`); in GEMM2 it is scaled by its slot's activation, weight and router scales
first, since each slot reads a different expert.
"""

import triton
import triton.language as tl

from moekit._direct_kernels import ROWS, _first_row, _weight_cols
from moekit._experts_fp8_kernels import _col_scales, _quantize, _scale_from_amax, _scaled_dot
from moekit._experts_kernels import _bias_and_activate


@triton.jit
def _rows_amax(first_row_ptr, num_rows, stride_row, K, CHUNK: tl.constexpr):
    """max |x| over `num_rows` rows of K values, read CHUNK at a time (one chunk per row
    for most hidden sizes, so a row costs one round trip)."""
    acc = tl.zeros([CHUNK], dtype=tl.float32)
    row_ptr = first_row_ptr
    for _ in range(0, num_rows):
        for k0 in range(0, K, CHUNK):
            offs = k0 + tl.arange(0, CHUNK)
            x = tl.load(row_ptr + offs, mask=offs < K, other=0.0)
            acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
        row_ptr += stride_row
    return tl.max(acc, axis=0)


@triton.jit
def _real_row(tile):
    """Row 0 of a [ROWS, BLOCK_K] tile whose other rows are zeros, as [BLOCK_K] (a sum over
    the rows: exact). Quantising this row, not the tile, puts the correctly rounded
    divisions on BLOCK_K values instead of ROWS × BLOCK_K: dividing the zero rows as well
    made the kernels several times slower on an H200 (bench/NOTES.md, fp8 direct path)."""
    return tl.sum(tile, axis=0)


@triton.jit
def _as_first_row(q, dtype: tl.constexpr):
    """[BLOCK_K] quantised values → the dot's [ROWS, BLOCK_K] tile in `dtype`, row 0 `q`."""
    rows = tl.arange(0, ROWS)[:, None]
    return tl.where(rows == 0, q[None, :], 0.0).to(dtype)


@triton.jit
def _group_scale(row, row_ptr, k0, K, valid, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                 FMAX: tl.constexpr, AMAX_FLOOR: tl.constexpr):
    """The dynamic scale of the 1×GROUP group holding K tile `row` [BLOCK_K]: from the tile
    itself when it is the group, else from the group's values in the row at `row_ptr`,
    read again (all zeros unless `valid`)."""
    if BLOCK_K == GROUP:
        amax = tl.max(tl.abs(row), axis=0)
    else:
        offs = (k0 // GROUP) * GROUP + tl.arange(0, GROUP)
        x = tl.load(row_ptr + offs, mask=(offs < K) & valid, other=0.0)
        amax = tl.max(tl.abs(x.to(tl.float32)), axis=0)
    return _scale_from_amax(amax, FMAX, AMAX_FLOOR)


@triton.jit
def _direct_gemm1_fp8_kernel(
    hidden_ptr,  # [M, H] bf16/fp16/fp32, not quantised
    x_scale_ptr,  # [1] the static input scale (read only when X_MODE == "static")
    w13_ptr,  # [E, N1, H] fp8; N1 = 2I (gate rows, then up rows) or I (relu2)
    ws_ptr,  # w13's scales: ws[e * s_we + (n // W_GROUP_N) * s_wn + (k // W_GROUP_K) * s_wk]
    b13_ptr,  # [E, N1] (read only when HAS_BIAS)
    topk_ids_ptr,  # [M*k] int32
    inter_ptr,  # [M*k, I] fp32, out
    num_tokens,
    num_experts,
    H,
    I,
    top_k,
    stride_hm,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_wsk,
    stride_be,
    stride_im,
    alpha,
    limit,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    X_MODE: tl.constexpr,  # "static", "tensor", "token" or "group"
    X_GROUP_K: tl.constexpr,  # the K group of "group"
    W_PER_K: tl.constexpr,
    W_GROUP_N: tl.constexpr,
    W_GROUP_K: tl.constexpr,
    W_UNIFORM_N: tl.constexpr,  # the column tile lies inside one scale group of N
    FMAX: tl.constexpr,
    AMAX_FLOOR: tl.constexpr,
    ROW_CHUNK: tl.constexpr,  # values of a row read at once for a per-token/tensor amax
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
    x_ptr = hidden_ptr + token * stride_hm
    x_scale = 1.0
    if X_MODE == "static":
        x_scale = tl.load(x_scale_ptr)
    elif X_MODE == "token":
        x_scale = _scale_from_amax(_rows_amax(x_ptr, 1, stride_hm, H, ROW_CHUNK), FMAX,
                                   AMAX_FLOOR)
    elif X_MODE == "tensor":
        x_scale = _scale_from_amax(_rows_amax(hidden_ptr, num_tokens, stride_hm, H, ROW_CHUNK),
                                   FMAX, AMAX_FLOOR)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    g_ptrs = (w13_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
              + offs_k[:, None])  # [BLOCK_K, BLOCK_N]
    u_ptrs = g_ptrs + I * stride_wn
    ws_base = ws_ptr + expert.to(tl.int64) * stride_wse
    ws_gate = ws_base + (offs_n // W_GROUP_N) * stride_wsn  # [BLOCK_N]
    ws_up = ws_base + ((offs_n + I) // W_GROUP_N) * stride_wsn
    ws_gate0 = ws_base + ((pid_n * BLOCK_N) // W_GROUP_N) * stride_wsn  # W_UNIFORM_N
    ws_up0 = ws_base + ((pid_n * BLOCK_N + I) // W_GROUP_N) * stride_wsn
    X_PER_K: tl.constexpr = X_MODE == "group"

    gate = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        x = _real_row(_first_row(x_ptr + k0, k0, offs_k, H, True, EVEN_K).to(tl.float32))
        if X_PER_K:
            tile_scale = _group_scale(x, x_ptr, k0, H, True, X_GROUP_K, BLOCK_K, FMAX,
                                      AMAX_FLOOR)
        else:
            tile_scale = x_scale
        xq = _as_first_row(_quantize(x, tile_scale, FMAX), w13_ptr.dtype.element_ty)
        k_step = (k0 // W_GROUP_K) * stride_wsk
        g = _weight_cols(g_ptrs, k0, col_ok, offs_k, H, True, EVEN_K, EVEN_N, False)
        g_scale = 1.0
        if W_PER_K:
            g_scale = _col_scales(ws_gate + k_step, ws_gate0 + k_step, col_ok, W_UNIFORM_N)
        gate = _scaled_dot(gate, xq, g, tile_scale, g_scale, X_PER_K, W_PER_K, W_UNIFORM_N)
        if GATED:
            u = _weight_cols(u_ptrs, k0, col_ok, offs_k, H, True, EVEN_K, EVEN_N, False)
            u_scale = 1.0
            if W_PER_K:
                u_scale = _col_scales(ws_up + k_step, ws_up0 + k_step, col_ok, W_UNIFORM_N)
            up = _scaled_dot(up, xq, u, tile_scale, u_scale, X_PER_K, W_PER_K, W_UNIFORM_N)
            u_ptrs += BLOCK_K
        g_ptrs += BLOCK_K

    # Scales constant along K, applied once.
    if not X_PER_K:
        gate = gate * x_scale
        up = up * x_scale
    if not W_PER_K:
        gate = gate * _col_scales(ws_gate, ws_gate0, col_ok, W_UNIFORM_N)
        if GATED:
            up = up * _col_scales(ws_up, ws_up0, col_ok, W_UNIFORM_N)
    result = _bias_and_activate(gate, up, b13_ptr, expert, offs_n, col_ok, I, stride_be, alpha,
                                limit, ACTIVATION, GATED, HAS_BIAS)
    rows = tl.arange(0, ROWS)[:, None]
    out_ptrs = inter_ptr + pair.to(tl.int64) * stride_im + rows * 0 + offs_n[None, :]
    tl.store(out_ptrs, result, mask=(rows == 0) & col_ok[None, :])


@triton.jit
def _slot_weight_scales(ws_ptr, slot_ids, scale_cols, scale_col0, col_ok, I, stride_wse,
                        stride_wsk, W_PER_K: tl.constexpr, W_GROUP_K: tl.constexpr,
                        W_UNIFORM_N: tl.constexpr, K_GROUPS: tl.constexpr):
    """Every slot's w2 scales for this column tile, read once before the K loop (a scale
    read inside it is a load no dot consumes, so the pipeliner leaves it exposed, one
    round trip per step): [SLOTS] (one scale per expert), [SLOTS, BLOCK_N] (per column)
    or [SLOTS, K_GROUPS] (per K group, the tile inside one N group); a placeholder when
    both vary (read per step instead)."""
    experts = slot_ids.to(tl.int64) * stride_wse
    if not W_PER_K:
        if W_UNIFORM_N:
            return tl.load(ws_ptr + experts + scale_col0)
        else:
            return tl.load(ws_ptr + experts[:, None] + scale_cols[None, :],
                           mask=col_ok[None, :], other=0.0)
    elif W_UNIFORM_N:
        groups = tl.arange(0, K_GROUPS)
        return tl.load(ws_ptr + experts[:, None] + scale_col0 + groups[None, :] * stride_wsk,
                       mask=(groups * W_GROUP_K < I)[None, :], other=0.0)
    else:
        return 0.0


@triton.jit
def _step_weight_scale(slot_ws, this, k0, ws_ptr, expert, scale_cols, scale_col0, col_ok,
                       stride_wse, stride_wsk, W_PER_K: tl.constexpr, W_GROUP_K: tl.constexpr,
                       W_UNIFORM_N: tl.constexpr, K_GROUPS: tl.constexpr):
    """This step's w2 scale from `_slot_weight_scales`' values (slot `this`, K tile k0): a
    scalar, or [1, BLOCK_N] where it varies along N."""
    if not W_PER_K:
        if W_UNIFORM_N:
            return tl.sum(tl.where(this, slot_ws, 0.0))
        else:
            return tl.sum(tl.where(this[:, None], slot_ws, 0.0), axis=0)[None, :]
    elif W_UNIFORM_N:
        group = tl.arange(0, K_GROUPS)[None, :] == k0 // W_GROUP_K
        return tl.sum(tl.sum(tl.where(this[:, None] & group, slot_ws, 0.0), axis=1), axis=0)
    else:
        ws = ws_ptr + expert.to(tl.int64) * stride_wse + (k0 // W_GROUP_K) * stride_wsk
        return _col_scales(ws + scale_cols, ws + scale_col0, col_ok, False)


@triton.jit
def _direct_gemm2_fp8_kernel(
    inter_ptr,  # [M*k, I] fp32
    inter_scale_ptr,  # [1] the static scale of GEMM2's input (read only when INTER_STATIC)
    w2_ptr,  # [E, H, I] fp8
    ws_ptr,  # w2's scales, addressed like GEMM1's
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
    stride_wse,
    stride_wsn,
    stride_wsk,
    stride_be,
    stride_om,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    INTER_STATIC: tl.constexpr,
    INTER_GROUP: tl.constexpr,  # the K group of GEMM2's dynamically quantised input
    W_PER_K: tl.constexpr,
    W_GROUP_N: tl.constexpr,
    W_GROUP_K: tl.constexpr,
    W_UNIFORM_N: tl.constexpr,
    K_GROUPS: tl.constexpr,  # ≥ the K groups of w2's scales (W_PER_K), a power of two
    FMAX: tl.constexpr,
    AMAX_FLOOR: tl.constexpr,
    TOP_K: tl.constexpr,
    SLOTS: tl.constexpr,  # TOP_K rounded up to a power of two
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: one token × BLOCK_N hidden columns, summed over its k slots.

    As `_direct_gemm2_kernel`: one flattened slot × K loop, the token's ids and router
    weights — and here its experts' weight scales — read once before it. Each step's
    product is multiplied by its activation scale, its weight scale and its router weight
    in fp32 and added; a skipped slot's router weight and loads are zero.
    """
    token = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    k_steps = tl.cdiv(I, BLOCK_K)
    cols = offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    scale_cols = (offs_n // W_GROUP_N) * stride_wsn  # [BLOCK_N]
    scale_col0 = ((pid_n * BLOCK_N) // W_GROUP_N) * stride_wsn
    slots = tl.arange(0, SLOTS)
    slot_ok = slots < TOP_K
    slot_ids = tl.load(topk_ids_ptr + token * TOP_K + slots, mask=slot_ok, other=-1)
    slot_ok = slot_ok & (slot_ids >= 0) & (slot_ids < num_experts)
    slot_ids = tl.where(slot_ok, slot_ids, 0)  # a skipped slot reads expert 0's scales
    router = tl.load(topk_weights_ptr + token * TOP_K + slots, mask=slot_ok, other=0.0)
    slot_ws = _slot_weight_scales(ws_ptr, slot_ids, scale_cols, scale_col0, col_ok, I,
                                  stride_wse, stride_wsk, W_PER_K, W_GROUP_K, W_UNIFORM_N,
                                  K_GROUPS)
    a_scale = 1.0
    if INTER_STATIC:
        a_scale = tl.load(inter_scale_ptr)

    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for step in range(0, TOP_K * k_steps):
        slot = step // k_steps
        k0 = (step - slot * k_steps) * BLOCK_K
        this = slots == slot
        expert = tl.sum(tl.where(this, slot_ids, 0))
        valid = tl.sum(tl.where(this & slot_ok, 1, 0)) > 0
        row_ptr = inter_ptr + (token * TOP_K + slot).to(tl.int64) * stride_im
        a = _real_row(_first_row(row_ptr + k0, k0, offs_k, I, valid, EVEN_K))
        if INTER_STATIC:
            tile_scale = a_scale
        else:
            tile_scale = _group_scale(a, row_ptr, k0, I, valid, INTER_GROUP, BLOCK_K, FMAX,
                                      AMAX_FLOOR)
        aq = _as_first_row(_quantize(a, tile_scale, FMAX), w2_ptr.dtype.element_ty)
        b = _weight_cols(w2_ptr + expert.to(tl.int64) * stride_we + k0 + cols, k0, col_ok,
                         offs_k, I, valid, EVEN_K, EVEN_N, True)
        w_scale = _step_weight_scale(slot_ws, this, k0, ws_ptr, expert, scale_cols, scale_col0,
                                     col_ok, stride_wse, stride_wsk, W_PER_K, W_GROUP_K,
                                     W_UNIFORM_N, K_GROUPS)
        step_scale = tile_scale * tl.sum(tl.where(this, router, 0.0))
        acc += tl.dot(aq, b) * (w_scale * step_scale)

    if HAS_BIAS:
        for slot in tl.static_range(TOP_K):
            this = slots == slot
            expert = tl.sum(tl.where(this, slot_ids, 0))
            b_ptrs = b2_ptr + expert.to(tl.int64) * stride_be + offs_n
            bias = tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)
            acc += (bias * tl.sum(tl.where(this, router, 0.0)))[None, :]
    rows = tl.arange(0, ROWS)[:, None]
    out_ptrs = out_ptr + token.to(tl.int64) * stride_om + rows * 0 + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows == 0) & col_ok[None, :])
