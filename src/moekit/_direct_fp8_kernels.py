"""Triton kernels of the fp8 direct (plan-free) experts path, for a handful of tokens.

    _direct_gemm1_fp8_kernel  grid (M*k pairs, I-tiles): the pair's fp8 token row × w13[e]ᵀ
                              (fp8), scales, bias, activation; writes `inter` [M*k, I] in
                              fp8 with its scales: GEMM2's input, quantised in the epilogue
                              (`_quantize_inter`)
    _direct_gemm2_fp8_kernel  grid (M × parts, H-tiles): each slot's fp8 `inter` row ×
                              w2[e]ᵀ (fp8), weight and router scales, bias, Σ over a part
                              of the token's slots in order; the parts added in order into
                              `out` [M, H] by the token's last program (`_sum_parts`)

The 16-bit direct path (`moekit._direct_kernels`) with the fp8 formats of
`moekit._experts_fp8_kernels`: the same one-real-row tensor-core tiles, ids read straight
from `topk_ids`, the combine fused into GEMM2 in slot order (deterministic).

A K step here is only the tiles' loads and the dot: every scale a step needs — the
token's 1×g group scales, each slot's expert's K-group weight scales — is read before
the K loop into a short vector (or a [slots, groups] matrix) and picked out per step;
GEMM2 applies what is constant along K (router weights, per-expert or per-channel weight
scales) after it, each slot's product held in a row of its own. Quantising inside the
loop, or reading a scale there, measured 2.5–10× slower than the plan path on an H200
(bench/NOTES.md, fp8 direct path): a step streams only a few KB of weights, so any fixed
cost per step — the reductions across warps and the divisions of quantising, the layout
round trip of a dot operand made in registers, a scale's round trip to memory (in the
compiled loop only the dot's tiles are copied asynchronously) — sets the pace. So both
GEMM inputs arrive quantised: hidden by the quantiser the plan path uses, GEMM2's input
by GEMM1's epilogue, after the loop. A 1×g group of it spans g / BLOCK_N of GEMM1's
column tiles (32 columns against g = 128 at the heuristic's tiles), so each program
stores its float32 columns, and the group's last program to arrive (a counter per
group, zeroed by the hidden quantiser that runs before GEMM1) quantises the whole group
from them: the same values whatever the order, one launch fewer than a row kernel
over GEMM1's float32 output. Quantising before the loop instead — each program
writing its rows to a scratch buffer, then a barrier — measured 0.83–1.03× (1.05–1.18×
on granite at M ≤ 2 only), and 0.54–0.93× with whole rows in one load: the prologue's
round trips delay every program's weight stream more than a launch costs (bench/NOTES.md,
session 11).
"""

import triton
import triton.language as tl

from moekit._direct_kernels import (
    ROWS,
    _clear_arrivals,
    _first_row,
    _gate_up_cols,
    _next_step,
    _part_slots,
    _slot_row,
    _sum_parts,
    _weight_cols,
)
from moekit._experts_fp8_kernels import _col_scales, _fp8_dot, _scaled_dot, _store_inter
from moekit._experts_kernels import _aligned, _bias_and_activate


@triton.jit
def _pick(values, index):
    """values[index] of a short vector held in registers (a masked sum: no memory access)."""
    return tl.sum(tl.where(tl.arange(0, values.shape[0]) == index, values, 0.0))


@triton.jit
def _k_group_scales(ptr, stride_k, K, GROUP_K: tl.constexpr, GROUPS: tl.constexpr):
    """[GROUPS] scales along K from `ptr`, one per K group (zeros past K)."""
    groups = tl.arange(0, GROUPS)
    return tl.load(ptr + groups * stride_k, mask=groups * GROUP_K < K, other=0.0)


@triton.jit
def _direct_gemm1_fp8_kernel(
    x_ptr,  # [M, H] fp8: hidden, quantised
    xs_ptr,  # hidden's scales: xs[token * stride_xsm (+ k // X_GROUP_K when X_PER_K)]
    w13_ptr,  # [E, N1, H] fp8; N1 = 2I (gate rows, then up rows) or I (relu2)
    ws_ptr,  # w13's scales: ws[e * s_we + (n // W_GROUP_N) * s_wn + (k // W_GROUP_K) * s_wk]
    b13_ptr,  # [E, N1] (read only when HAS_BIAS)
    topk_ids_ptr,  # [M*k] int32, or int64 (checked against E before narrowing)
    inter_ptr,  # [M*k, I] fp8, out: GEMM2's input
    inter_scale_ptr,  # "static": [1], read; else [M*k, nG] fp32 out, one per 1×INTER_GROUP
    scratch_ptr,  # "last": [M*k, I] fp32, GEMM1's output before quantisation
    counts_ptr,  # "last": [M*k, nG] int32, zero on entry: arrivals per group
    arrivals_ptr,  # [M, tiles_per_token] int32: GEMM2's counters, zeroed (CLEAR_ARRIVALS)
    num_experts,
    H,
    I,
    top_k,
    tiles_per_token,
    stride_xm,
    stride_xsm,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_wsk,
    stride_be,
    stride_im,  # of inter (and of the scratch: the same shape)
    stride_ism,  # of inter's scales (and of the counts)
    alpha,
    limit,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    X_PER_K: tl.constexpr,
    X_GROUP_K: tl.constexpr,
    X_GROUPS: tl.constexpr,  # ≥ H's 1×g groups (X_PER_K), a power of two
    W_PER_K: tl.constexpr,
    W_GROUP_N: tl.constexpr,
    W_GROUP_K: tl.constexpr,
    W_UNIFORM_N: tl.constexpr,  # the column tile lies inside one scale group of N
    W_GROUPS: tl.constexpr,  # ≥ H's weight K groups (W_PER_K), a power of two
    SHARED_GROUPS: tl.constexpr,  # hidden's and the tile's weight scales group K alike
    CLEAR_ARRIVALS: tl.constexpr,
    INTER_MODE: tl.constexpr,  # "static", "groups" (BLOCK_N holds whole groups) or "last"
    INTER_GROUP: tl.constexpr,  # g of GEMM2's input's 1×g groups (1 when static)
    ROW_ALIGN: tl.constexpr,  # divides H, I and the row strides (`_aligned`)
    FMAX: tl.constexpr,
    AMAX_FLOOR: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of SUB_K
    SUB_K: tl.constexpr,  # ≤ every K group of the scheme (BLOCK_K where none is finer)
    SWAP_AB: tl.constexpr,  # gate and up rows as one swapped operand (`_stacked_gate_up`)
):
    """One program: one pair × BLOCK_N intermediate columns (CLEAR_ARRIVALS: as
    `_direct_gemm1_kernel`). A K tile wider than a scale group runs as SUB_K-deep
    sub-steps, each its own loads and dot with its group's scales."""
    H = _aligned(H, ROW_ALIGN)
    I = _aligned(I, ROW_ALIGN)
    stride_xm = _aligned(stride_xm, ROW_ALIGN)
    stride_we = _aligned(stride_we, ROW_ALIGN)
    stride_wn = _aligned(stride_wn, ROW_ALIGN)
    stride_im = _aligned(stride_im, ROW_ALIGN)
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    if CLEAR_ARRIVALS:
        _clear_arrivals(arrivals_ptr, pair, pid_n, top_k, tiles_per_token)
    expert = tl.load(topk_ids_ptr + pair)
    if (expert < 0) | (expert >= num_experts):  # before narrowing int64 ids
        return
    expert = expert.to(tl.int32)
    token = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < I
    offs_k = tl.arange(0, SUB_K)
    x_row = x_ptr + token * stride_xm
    xs_row = xs_ptr + token * stride_xsm
    g_ptrs, u_ptrs = _gate_up_cols(w13_ptr, expert, offs_n, offs_k, I, stride_we, stride_wn)
    ws_base = ws_ptr + expert.to(tl.int64) * stride_wse
    ws_gate = ws_base + (offs_n // W_GROUP_N) * stride_wsn  # [BLOCK_N]
    ws_up = ws_base + ((offs_n + I) // W_GROUP_N) * stride_wsn
    ws_gate0 = ws_base + ((pid_n * BLOCK_N) // W_GROUP_N) * stride_wsn  # W_UNIFORM_N
    ws_up0 = ws_base + ((pid_n * BLOCK_N + I) // W_GROUP_N) * stride_wsn
    # Scales that vary along K, read once (see the module doc).
    if X_PER_K:
        x_scales = _k_group_scales(xs_row, 1, H, X_GROUP_K, X_GROUPS)
    else:
        x_scales = 0.0  # a stand-in; not read
    if W_PER_K and W_UNIFORM_N:
        g_scales = _k_group_scales(ws_gate0, stride_wsk, H, W_GROUP_K, W_GROUPS)
        u_scales = _k_group_scales(ws_up0, stride_wsk, H, W_GROUP_K, W_GROUPS)
        if SHARED_GROUPS:  # products with hidden's: two picks per step, not three
            g_scales = g_scales * x_scales
            u_scales = u_scales * x_scales

    if SWAP_AB:
        if not (W_PER_K and W_UNIFORM_N):
            g_scales = 0.0  # stand-ins; not read
            u_scales = 0.0
        gate, up = _stacked_gate_up(
            x_row, x_scales, w13_ptr, ws_base, g_scales, u_scales, expert, pid_n, H, I,
            stride_we, stride_wn, stride_wsn, stride_wsk, GATED, EVEN_K, EVEN_N, X_PER_K,
            X_GROUP_K, W_PER_K, W_GROUP_N, W_GROUP_K, W_UNIFORM_N, SHARED_GROUPS, BLOCK_N,
            BLOCK_K, SUB_K)
    else:
        gate = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            # SUB_K-deep sub-steps, each inside one scale group (one unless groups are finer
            # than the K tile).
            for sub in tl.static_range(BLOCK_K // SUB_K):
                kk = k0 + sub * SUB_K
                x, x_scale = _hidden_step(x_row, x_scales, kk, offs_k, H, EVEN_K, X_PER_K,
                                          X_GROUP_K, SHARED_GROUPS)
                g = _weight_cols(g_ptrs + sub * SUB_K, kk, col_ok, offs_k, H, True, EVEN_K,
                                 EVEN_N, False)
                g_scale = 1.0
                u_scale = 1.0
                if W_PER_K:
                    if W_UNIFORM_N:
                        g_scale = _pick(g_scales, kk // W_GROUP_K)
                        u_scale = _pick(u_scales, kk // W_GROUP_K)
                    else:  # a sub-step past H (masked tiles) keeps the last group's scales
                        k_step = (tl.minimum(kk, H - 1) // W_GROUP_K) * stride_wsk
                        g_scale = _col_scales(ws_gate + k_step, ws_gate0 + k_step, col_ok,
                                              False)
                        u_scale = _col_scales(ws_up + k_step, ws_up0 + k_step, col_ok, False)
                gate = _scaled_dot(gate, x, g, x_scale, g_scale, X_PER_K, W_PER_K,
                                   W_UNIFORM_N)
                if GATED:
                    u = _weight_cols(u_ptrs + sub * SUB_K, kk, col_ok, offs_k, H, True, EVEN_K,
                                     EVEN_N, False)
                    up = _scaled_dot(up, x, u, x_scale, u_scale, X_PER_K, W_PER_K,
                                     W_UNIFORM_N)
            u_ptrs += BLOCK_K
            g_ptrs += BLOCK_K

    # Scales constant along K, applied once.
    if not X_PER_K:
        row_scale = tl.load(xs_row)
        gate = gate * row_scale
        up = up * row_scale
    if not W_PER_K:
        gate = gate * _col_scales(ws_gate, ws_gate0, col_ok, W_UNIFORM_N)
        if GATED:
            up = up * _col_scales(ws_up, ws_up0, col_ok, W_UNIFORM_N)
    result = _bias_and_activate(gate, up, b13_ptr, expert, offs_n, col_ok, I, stride_be, alpha,
                                limit, ACTIVATION, GATED, HAS_BIAS)
    # Columns past I must not raise a group's amax.
    result = tl.where(col_ok[None, :], result, 0.0)
    _quantize_inter(result, pair.to(tl.int64), pid_n, I, inter_ptr, inter_scale_ptr,
                    scratch_ptr, counts_ptr, stride_im, stride_ism, INTER_MODE, INTER_GROUP,
                    FMAX, AMAX_FLOOR)


@triton.jit
def _hidden_step(x_row, x_scales, kk, offs_k, H, EVEN_K: tl.constexpr, X_PER_K: tl.constexpr,
                 X_GROUP_K: tl.constexpr, SHARED_GROUPS: tl.constexpr):
    """The GEMM1 sub-step at K = kk's hidden tile (the pair's row in row 0 of ROWS) and its
    scale where hidden's scales vary along K on their own (else 1: applied after the loop,
    or folded into the weight scales)."""
    x = _first_row(x_row + kk, kk, offs_k, H, True, EVEN_K)
    x_scale = 1.0
    if X_PER_K and not SHARED_GROUPS:
        x_scale = _pick(x_scales, kk // X_GROUP_K)
    return x, x_scale


@triton.jit
def _stacked_gate_up(x_row, x_scales, w13_ptr, ws_base, g_scales, u_scales, expert, pid_n, H, I,
                     stride_we, stride_wn, stride_wsn, stride_wsk, GATED: tl.constexpr,
                     EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, X_PER_K: tl.constexpr,
                     X_GROUP_K: tl.constexpr, W_PER_K: tl.constexpr, W_GROUP_N: tl.constexpr,
                     W_GROUP_K: tl.constexpr, W_UNIFORM_N: tl.constexpr,
                     SHARED_GROUPS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SUB_K: tl.constexpr):
    """The direct GEMM1's K loop swapped (`moekit._fp8_swap`): the tile's BLOCK_N gate rows
    and (GATED) its BLOCK_N up rows of w13[e] stacked into one operand, so a 32-column
    tile fills the fp8 MMA's 64 rows, `[gate; up] · xᵀ` — one dot a step, not two. Returns
    (gate, up) [ROWS, BLOCK_N] each, K-varying scales applied per step as the unswapped
    loop does (`x_scales`, `g_scales`, `u_scales` as read there)."""
    W_ROWS: tl.constexpr = 2 * BLOCK_N if GATED else BLOCK_N
    stacked = tl.arange(0, W_ROWS)
    is_up = stacked >= BLOCK_N
    cols = pid_n * BLOCK_N + stacked - tl.where(is_up, BLOCK_N, 0)  # columns of I
    col_ok = cols < I
    w_rows = cols + tl.where(is_up, I, 0)  # rows of w13[e]
    offs_k = tl.arange(0, SUB_K)
    w_ptrs = (w13_ptr + expert.to(tl.int64) * stride_we + w_rows[None, :] * stride_wn
              + offs_k[:, None])  # [SUB_K, W_ROWS]
    ws_rows = ws_base + (w_rows // W_GROUP_N) * stride_wsn  # [W_ROWS]
    acc = tl.zeros([W_ROWS, ROWS], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        for sub in tl.static_range(BLOCK_K // SUB_K):
            kk = k0 + sub * SUB_K
            x, x_scale = _hidden_step(x_row, x_scales, kk, offs_k, H, EVEN_K, X_PER_K,
                                      X_GROUP_K, SHARED_GROUPS)
            w = _weight_cols(w_ptrs + sub * SUB_K, kk, col_ok, offs_k, H, True, EVEN_K, EVEN_N,
                             False)
            w_scale = 1.0
            if W_PER_K:
                if W_UNIFORM_N:
                    group = kk // W_GROUP_K
                    w_scale = tl.where(is_up, _pick(u_scales, group),
                                       _pick(g_scales, group))[:, None]
                else:  # a sub-step past H (masked tiles) keeps the last group's scales
                    k_step = (tl.minimum(kk, H - 1) // W_GROUP_K) * stride_wsk
                    w_scale = _col_scales(ws_rows + k_step, ws_rows, col_ok, False, True)
            acc = _scaled_dot(acc, x, w, x_scale, w_scale, X_PER_K, W_PER_K, False, True)
        w_ptrs += BLOCK_K
    rows_first = tl.trans(acc)  # [ROWS, W_ROWS]
    if GATED:
        gate, up = tl.split(tl.permute(tl.reshape(rows_first, [ROWS, 2, BLOCK_N]), (0, 2, 1)))
        return gate, up
    else:
        return rows_first, tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)


@triton.jit
def _quantize_inter(result, pair, pid_n, I, inter_ptr, inter_scale_ptr, scratch_ptr, counts_ptr,
                    stride_im, stride_ism, INTER_MODE: tl.constexpr,
                    INTER_GROUP: tl.constexpr, FMAX: tl.constexpr, AMAX_FLOOR: tl.constexpr):
    """GEMM2's input from this program's `result` [ROWS, BLOCK_N] (row 0 the pair's; the
    columns from pid_n · BLOCK_N): by the static scale or this tile's whole groups right
    away; else ("last", a group wider than the tile) stored in float32, and quantised
    whole by the group's last program to arrive."""
    BLOCK_N: tl.constexpr = result.shape[1]
    first_n = pid_n * BLOCK_N
    rows = tl.arange(0, ROWS)
    slots = pair + rows * 0
    if INTER_MODE != "last":
        _store_inter(result, 1.0, first_n, slots, rows == 0, inter_ptr, inter_scale_ptr, I,
                     stride_im, stride_ism, INTER_MODE == "static", INTER_GROUP, False, FMAX,
                     AMAX_FLOOR)
    else:
        offs_n = first_n + tl.arange(0, BLOCK_N)
        s_ptrs = scratch_ptr + pair * stride_im + rows[:, None] * 0 + offs_n[None, :]
        tl.store(s_ptrs, result, mask=(rows == 0)[:, None] & (offs_n < I)[None, :])
        tl.debug_barrier()  # every thread's stores issued before the arrival
        group = first_n // INTER_GROUP
        group_n = group * INTER_GROUP
        programs = tl.cdiv(tl.minimum(I - group_n, INTER_GROUP), BLOCK_N)
        arrived = tl.atomic_add(counts_ptr + pair * stride_ism + group, 1)  # acq_rel, GPU
        if arrived == programs - 1:
            offs = group_n + tl.arange(0, INTER_GROUP)
            values = tl.load(scratch_ptr + pair * stride_im + offs, mask=offs < I, other=0.0,
                             cache_modifier=".cg")  # past L1: the other programs' stores
            one = tl.zeros([1], dtype=tl.int64)
            _store_inter(values[None, :], 1.0, group_n, pair + one, one == 0, inter_ptr,
                         inter_scale_ptr, I, stride_im, stride_ism, False, INTER_GROUP, False,
                         FMAX, AMAX_FLOOR)


@triton.jit
def _slot_weight_scales(ws_ptr, slot_ids, scale_cols, scale_col0, col_ok, I, stride_wse,
                        stride_wsk, W_PER_K: tl.constexpr, W_GROUP_K: tl.constexpr,
                        W_UNIFORM_N: tl.constexpr, W_GROUPS: tl.constexpr):
    """Every slot's w2 scales for this column tile, read once: [SLOTS] (one scale per
    expert), [SLOTS, BLOCK_N] (per column) or [SLOTS, W_GROUPS] (per K group, the tile
    inside one N group); a placeholder when both vary (read per step)."""
    experts = slot_ids.to(tl.int64) * stride_wse
    if not W_PER_K:
        if W_UNIFORM_N:
            return tl.load(ws_ptr + experts + scale_col0)
        else:
            return tl.load(ws_ptr + experts[:, None] + scale_cols[None, :],
                           mask=col_ok[None, :], other=0.0)
    elif W_UNIFORM_N:
        groups = tl.arange(0, W_GROUPS)
        return tl.load(ws_ptr + experts[:, None] + scale_col0 + groups[None, :] * stride_wsk,
                       mask=(groups * W_GROUP_K < I)[None, :], other=0.0)
    else:
        return 0.0


@triton.jit
def _step_weight_scale(slot_ws, this, k0, ws_ptr, expert, scale_cols, scale_col0, col_ok,
                       stride_wse, stride_wsk, W_GROUP_K: tl.constexpr,
                       W_UNIFORM_N: tl.constexpr, W_GROUPS: tl.constexpr,
                       SWAP_AB: tl.constexpr):
    """This step's w2 scale where the weight's scales group K (the others are applied
    after the loop): from `_slot_weight_scales`' [SLOTS, W_GROUPS] (slot `this`, K tile
    k0), a scalar; or read for this step, [1, BLOCK_N] ([BLOCK_N, 1] swapped), where they
    vary along N too."""
    if W_UNIFORM_N:
        group = tl.arange(0, W_GROUPS)[None, :] == k0 // W_GROUP_K
        return tl.sum(tl.sum(tl.where(this[:, None] & group, slot_ws, 0.0), axis=1), axis=0)
    else:
        ws = ws_ptr + expert.to(tl.int64) * stride_wse + (k0 // W_GROUP_K) * stride_wsk
        return _col_scales(ws + scale_cols, ws + scale_col0, col_ok, False, SWAP_AB)


@triton.jit
def _part_rows(topk_ids_ptr, topk_weights_ptr, token, first, num_experts, TOP_K: tl.constexpr,
               PER_PART: tl.constexpr):
    """A part's slots as the rows of the dot's tile (row j: slot first + j): (valid [ROWS],
    expert ids [ROWS] and router weights [ROWS], 0 where not valid)."""
    rows = tl.arange(0, ROWS)
    row_slot = first + rows
    row_ok = (rows < PER_PART) & (row_slot < TOP_K)
    row_ids = tl.load(topk_ids_ptr + token * TOP_K + row_slot, mask=row_ok, other=-1)
    row_ok = row_ok & (row_ids >= 0) & (row_ids < num_experts)  # before narrowing int64
    router = tl.load(topk_weights_ptr + token * TOP_K + row_slot, mask=row_ok,
                     other=0.0).to(tl.float32)
    return row_ok, tl.where(row_ok, row_ids, 0).to(tl.int32), router


@triton.jit
def _sum_rows(acc, router, row_ok, row_ids, b2_ptr, offs_n, col_ok, stride_be,
              HAS_BIAS: tl.constexpr):
    """Σ_j router_j · (acc_j + b2[e_j]) over the tile's rows (`_part_rows`), returned in
    row 0 of a [ROWS, BLOCK_N] tile (the form `_sum_parts` stores)."""
    total = tl.sum(acc * router[:, None], axis=0)
    if HAS_BIAS:
        bias = tl.load(b2_ptr + row_ids.to(tl.int64)[:, None] * stride_be + offs_n[None, :],
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        total += tl.sum(bias * router[:, None], axis=0)
    return tl.where((tl.arange(0, ROWS) == 0)[:, None], total[None, :], 0.0)


@triton.jit
def _direct_gemm2_fp8_kernel(
    inter_ptr,  # [M*k, I] fp8: GEMM2's input, quantised
    inter_scale_ptr,  # [M*k, ceil(I / A_GROUP_K)] fp32; static: [1]
    w2_ptr,  # [E, H, I] fp8
    ws_ptr,  # w2's scales, addressed like GEMM1's
    b2_ptr,  # [E, H] (read only when HAS_BIAS)
    topk_ids_ptr,  # [M*k] int32, or int64 (checked against E before narrowing)
    topk_weights_ptr,  # [M*k] fp32, or 16-bit read as fp32
    out_ptr,  # [M, H], out
    partials_ptr,  # [M*PARTS, H] fp32 (PARTS > 1)
    arrivals_ptr,  # [M, H-tiles] int32, zeroed by GEMM1 (PARTS > 1)
    num_experts,
    H,
    I,
    stride_im,
    stride_ism,
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
    A_STATIC: tl.constexpr,
    A_GROUP_K: tl.constexpr,
    A_GROUPS: tl.constexpr,  # ≥ I's 1×g groups of the input's scales, a power of two
    W_PER_K: tl.constexpr,
    W_GROUP_N: tl.constexpr,
    W_GROUP_K: tl.constexpr,
    W_UNIFORM_N: tl.constexpr,
    W_GROUPS: tl.constexpr,  # ≥ I's weight K groups (W_PER_K), a power of two
    SHARED_GROUPS: tl.constexpr,  # the input's and the tile's weight scales group K alike
    TOP_K: tl.constexpr,
    SLOTS: tl.constexpr,  # TOP_K rounded up to a power of two
    PER_PART: tl.constexpr,  # slots one program sums
    PARTS: tl.constexpr,  # programs per token and column tile: ceil(TOP_K / PER_PART)
    ROW_ALIGN: tl.constexpr,  # divides H, I and the row strides (`_aligned`)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,  # the K loop's products transposed (`moekit._fp8_swap`)
):
    """One program: one token × BLOCK_N hidden columns, summed over PER_PART of its slots
    (`_sum_parts` adds the PARTS programs' sums).

    As `_direct_gemm2_kernel`: one flattened slot × K loop, the token's ids read once
    before it — and the scales that vary along K too: the slots' input scales
    ([SLOTS, A_GROUPS], or one static scale) and block-scaled weights' ([SLOTS, W_GROUPS]),
    multiplied into each step's product in fp32. Each slot's product goes to a row of
    its own of the dot's 16-row tile (row j: the part's slot j; PER_PART ≤ 16), so what
    is constant along K — the router weight, a per-expert or per-channel weight scale — is
    applied once after the loop, row by row, before the rows are summed in slot order: a
    per-channel scale picked per step out of [SLOTS, BLOCK_N] cost a cross-warp reduction
    every step (1.1–1.45× the per-tensor GEMM2, H200). A skipped slot's loads and weights
    are zero.
    """
    H = _aligned(H, ROW_ALIGN)
    I = _aligned(I, ROW_ALIGN)
    stride_im = _aligned(stride_im, ROW_ALIGN)
    stride_we = _aligned(stride_we, ROW_ALIGN)
    stride_wn = _aligned(stride_wn, ROW_ALIGN)
    stride_om = _aligned(stride_om, ROW_ALIGN)
    token = tl.program_id(0) // PARTS
    part = tl.program_id(0) - token * PARTS
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    k_steps = tl.cdiv(I, BLOCK_K)
    cols = offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    scale_cols = (offs_n // W_GROUP_N) * stride_wsn  # [BLOCK_N]
    scale_col0 = ((pid_n * BLOCK_N) // W_GROUP_N) * stride_wsn
    slots, slot_ok, slot_ids, first = _part_slots(topk_ids_ptr, token, part, num_experts,
                                                  TOP_K, SLOTS, PER_PART)
    if W_PER_K:
        slot_ws = _slot_weight_scales(ws_ptr, slot_ids, scale_cols, scale_col0, col_ok, I,
                                      stride_wse, stride_wsk, W_PER_K, W_GROUP_K, W_UNIFORM_N,
                                      W_GROUPS)
    if not A_STATIC:
        groups = tl.arange(0, A_GROUPS)
        pairs = (token * TOP_K + slots).to(tl.int64)
        slot_as = tl.load(inter_scale_ptr + pairs[:, None] * stride_ism + groups[None, :],
                          mask=slot_ok[:, None] & (groups * A_GROUP_K < I)[None, :], other=0.0)
        if SHARED_GROUPS:  # one [SLOTS, groups] matrix: one pick per step, not two
            slot_as = slot_as * slot_ws

    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)
    else:
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    slot = first
    k0 = first * 0
    for _ in range(0, PER_PART * k_steps):
        this = slots == slot
        expert = tl.sum(tl.where(this, slot_ids, 0))
        valid = tl.sum(tl.where(this & slot_ok, 1, 0)) > 0
        a = _slot_row(inter_ptr + (token * TOP_K + slot).to(tl.int64) * stride_im + k0,
                      slot - first, k0, offs_k, I, valid, EVEN_K)
        b = _weight_cols(w2_ptr + expert.to(tl.int64) * stride_we + k0 + cols, k0, col_ok,
                         offs_k, I, valid, EVEN_K, EVEN_N, True)
        if A_STATIC:
            a_scale = 1.0
        else:
            group = tl.arange(0, A_GROUPS)[None, :] == k0 // A_GROUP_K
            a_scale = tl.sum(tl.sum(tl.where(this[:, None] & group, slot_as, 0.0), axis=1),
                             axis=0)
        if SHARED_GROUPS:
            acc += _fp8_dot(a, b, SWAP_AB) * a_scale
        elif W_PER_K:
            w_scale = _step_weight_scale(slot_ws, this, k0, ws_ptr, expert, scale_cols,
                                         scale_col0, col_ok, stride_wse, stride_wsk,
                                         W_GROUP_K, W_UNIFORM_N, W_GROUPS, SWAP_AB)
            acc += _fp8_dot(a, b, SWAP_AB) * (w_scale * a_scale)
        elif A_STATIC:
            acc += _fp8_dot(a, b, SWAP_AB)
        else:
            acc += _fp8_dot(a, b, SWAP_AB) * a_scale
        slot, k0 = _next_step(slot, k0, I, BLOCK_K)
    if SWAP_AB:
        acc = tl.trans(acc)

    # Row j of acc is slot first + j's product: its constant scales, then the sum.
    row_ok, row_ids, router = _part_rows(topk_ids_ptr, topk_weights_ptr, token, first,
                                         num_experts, TOP_K, PER_PART)
    if A_STATIC:
        acc = acc * tl.load(inter_scale_ptr)
    if not W_PER_K:  # [ROWS] per expert, or [ROWS, BLOCK_N] per channel
        row_ws = _slot_weight_scales(ws_ptr, row_ids, scale_cols, scale_col0, col_ok, I,
                                     stride_wse, stride_wsk, W_PER_K, W_GROUP_K, W_UNIFORM_N,
                                     W_GROUPS)
        if W_UNIFORM_N:
            acc = acc * row_ws[:, None]
        else:
            acc = acc * row_ws
    acc = _sum_rows(acc, router, row_ok, row_ids, b2_ptr, offs_n, col_ok, stride_be, HAS_BIAS)
    _sum_parts(acc, out_ptr, partials_ptr, arrivals_ptr, token, part, pid_n, offs_n, col_ok,
               H, stride_om, PARTS)
