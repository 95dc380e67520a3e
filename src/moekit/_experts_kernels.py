"""Triton kernels of the fused experts pipeline.

    _gemm1_kernel     grid (row tiles × I-tiles): rows of `hidden` gathered through the
                      dispatch plan, times w13[e]ᵀ, + bias, activation in the epilogue;
                      writes `inter` [capacity, I] in plan-slot order (contiguous per expert)
    _gemm2_kernel     grid (row tiles × H-tiles), or persistent: inter rows × w2[e]ᵀ, + bias,
                      × router weight; writes one row per pair, `pair_out` [M*k, H]
    _combine_kernel   grid (M, H-tiles): out[m] = Σ_j pair_out[m*k + j] over valid slots,
                      in slot order, so the result is deterministic

A row tile is one plan block, or with tail tiles (TAIL_M = BLOCK_M / 2) an entry of the
plan's work list (`DispatchPlan.tiles`): two TAIL_M-row plan blocks of one expert, or a
run's odd last block, which GEMM1 computes with the same code at TAIL_M rows (GEMM2's
persistent loop at full height, stores masked: `_gemm2_work_tile`), so an expert's run
is padded to TAIL_M rows instead of BLOCK_M. A program whose row tile holds no expert
(−1: past the last run) exits at once. Row offsets into `hidden`, `pair_out` and the
per-expert weight bases are 64-bit (M·k·H and E·2I·H can exceed 2^31); offsets inside a
tile stay 32-bit.

On Hopper the weight tiles (and GEMM2's `inter` tiles, which are contiguous) can come
through TMA descriptors instead of pointers (`W_TMA`, `TMA`): the copy engine fetches
whole tiles into shared memory, which measured 5–14% faster on prefill GEMMs
(bench/NOTES.md, v2). Descriptors see the weights as one 2-D matrix [E·N, K], so a tile
may run past its expert's last row into the next expert's; those columns are never
stored. Rows are still gathered by pointer: Hopper's TMA has no row gather.
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
def _aligned(x, ALIGN: tl.constexpr):
    """x, known to the compiler as a multiple of ALIGN (which the host checked,
    `moekit._intmath.row_align`). Triton proves a row stride or length aligned only when
    it is a multiple of 16 elements (its own specialisation of integer arguments); rows
    of 1000 or 360 elements (an 8-way tensor-parallel shard of gpt-oss) then load an
    element at a time, and the 16-bit GEMMs spilled 0.3–4.6 KB of registers (sm_90
    `ptxas -v`). (x // ALIGN) · ALIGN is x, and makes such rows load as 16-byte vectors
    when ALIGN is 8; at 16 Triton knows already."""
    if 1 < ALIGN and ALIGN < 16:
        return (x // ALIGN) * ALIGN
    else:
        return x


@triton.jit
def _bias_and_activate(gate, up, b13_ptr, expert, offs_n, col_ok, I, stride_be, alpha, limit,
                       ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """GEMM1's epilogue on fp32 [rows, BLOCK_N] tiles: + b13[expert] (gate, then up), then
    the activation."""
    if HAS_BIAS:
        b_base = b13_ptr + expert.to(tl.int64) * stride_be
        gate += tl.load(b_base + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up += tl.load(b_base + I + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return _activate(gate, up, ACTIVATION, alpha, limit)


@triton.jit
def _tile_of(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile id → (row block, column tile), GROUP_M row blocks sharing columns in L2."""
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _expert_tile_of(pid, num_n, tiles_ptr, block_experts_ptr, expert_offsets_ptr,
                    GROUP_M: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_M: tl.constexpr):
    """Tile id → (row tile, column tile), in groups that never split an expert's row tiles.

    `_tile_of`'s groups of GROUP_M row tiles cut through experts: an expert whose row tiles
    straddle two groups has its weight column tiles read once per group, a wave apart, and
    at ~2 row tiles an expert that is 16% of deepseek-v3's experts at M = 8192 (42% at
    16384), their second reads missing L2. Here each expert's row tiles, GROUP_M at a time
    from its first, take each column tile in turn. A group's tile ids are
    [first · num_n, (first + size) · num_n), so the row tile pid // num_n lies in this
    program's group, and its expert's run (`expert_offsets`) gives the group.
    """
    m0 = pid // num_n
    if TAIL_M:  # row tiles are work-list entries of two TAIL_M-row plan blocks
        entry = tl.load(tiles_ptr + m0)
        block = entry >> 1
        expert = tl.load(block_experts_ptr + block, mask=entry >= 0, other=-1)
        plan_rows: tl.constexpr = TAIL_M
        blocks_per_tile: tl.constexpr = 2
    else:
        block = m0
        expert = tl.load(block_experts_ptr + block)
        plan_rows: tl.constexpr = BLOCK_M
        blocks_per_tile: tl.constexpr = 1
    pid_m = m0
    pid_n = pid % num_n
    if expert >= 0:  # past the last run the tile does nothing: any coordinates will do
        first_block = tl.load(expert_offsets_ptr + expert) // plan_rows
        end_block = tl.load(expert_offsets_ptr + expert + 1) // plan_rows
        place = (block - first_block) // blocks_per_tile  # m0's place in its expert's run
        count = (end_block - first_block + blocks_per_tile - 1) // blocks_per_tile
        start = place // GROUP_M * GROUP_M
        size = tl.minimum(count - start, GROUP_M)
        first = m0 - place + start
        local = pid - first * num_n
        pid_m = first + local % size
        pid_n = local // size
    return pid_m, pid_n


@triton.jit
def _ordered_tile_of(pid, num_m, num_n, tiles_ptr, block_experts_ptr, expert_offsets_ptr,
                     GROUP_M: tl.constexpr, EXPERT_GROUPS: tl.constexpr, TAIL_M: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    """`_expert_tile_of` with EXPERT_GROUPS (`moekit._tile_order`), else `_tile_of`."""
    if EXPERT_GROUPS:
        pid_m, pid_n = _expert_tile_of(pid, num_n, tiles_ptr, block_experts_ptr,
                                       expert_offsets_ptr, GROUP_M, TAIL_M, BLOCK_M)
    else:
        pid_m, pid_n = _tile_of(pid, num_m, num_n, GROUP_M)
    return pid_m, pid_n


@triton.jit
def _run_of(expert_offsets_ptr, num_experts, num_n, BLOCK_M: tl.constexpr):
    """A persistent program's share of the tiles in use: (row tiles in use — the plan's
    blocks up to the last run's end —, its first tile, one past its last), the tiles
    (row tiles × num_n) cut into `num_programs` contiguous runs of equal length ± 1."""
    used = tl.load(expert_offsets_ptr + num_experts) // BLOCK_M
    total = used * num_n
    p = tl.program_id(0)
    programs = tl.num_programs(0)
    return used, p * total // programs, (p + 1) * total // programs


@triton.jit
def _row_tile(ptrs, k0, offs_k, K, EVEN_K: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] tile of row-major rows (activations), masked only where K is
    ragged; rows are never masked (padding rows only reach unstored outputs)."""
    if EVEN_K:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=(offs_k + k0 < K)[None, :], other=0.0)


@triton.jit
def _weight_tile(ptrs, desc, row, k0, col_ok, offs_k, K, EVEN_K: tl.constexpr,
                 EVEN_N: tl.constexpr, W_TMA: tl.constexpr):
    """A [BLOCK_K, BLOCK_N] tile of a weight stored [N, K]: by TMA from `row`, or by pointer."""
    if W_TMA:
        return desc.load([row, k0]).T
    elif EVEN_K and EVEN_N:
        return tl.load(ptrs)
    elif EVEN_K:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs, mask=col_ok[None, :] & (offs_k + k0 < K)[:, None], other=0.0)


@triton.jit
def _work_tile(tiles_ptr, block_experts_ptr, pid_m, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr):
    """Row tile `pid_m` → (first plan slot, expert or −1, whether it is a TAIL_M-row tail).

    Without tail tiles row tile i is plan block i. With them (TAIL_M = BLOCK_M / 2, the
    plan padded to TAIL_M) it is entry i of the plan's work list (`DispatchPlan.tiles`):
    plan block · 2 + 1 if the tile is its run's odd last block, −1 past the list's end.
    """
    if TAIL_M:
        entry = tl.load(tiles_ptr + pid_m)
        block = entry >> 1
        expert = tl.load(block_experts_ptr + block, mask=entry >= 0, other=-1)
        return block * TAIL_M, expert, (entry & 1) == 1
    else:
        expert = tl.load(block_experts_ptr + pid_m)
        return pid_m * BLOCK_M, expert, expert < -1  # never a tail


@triton.jit
def _gemm1_tile(
    hidden_ptr, w13_ptr, w13_desc, b13_ptr, topk_weights_ptr, inter_ptr, sorted_pairs_ptr,
    first_slot, expert, pid_n, num_pairs, H, I, top_k, stride_hm, stride_we, stride_wn,
    stride_be, stride_im, alpha, limit,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    W_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """BLOCK_M plan slots from `first_slot` (one expert) × BLOCK_N intermediate columns,
    written to `inter` in plan-slot order."""
    slots = first_slot + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + slots)
    _gemm1_rows(
        hidden_ptr, w13_ptr, w13_desc, b13_ptr, topk_weights_ptr, inter_ptr, pairs,
        pairs < num_pairs, slots.to(tl.int64), expert, pid_n, H, I, top_k, stride_hm,
        stride_we, stride_wn, stride_be, stride_im, alpha, limit, ACTIVATION, GATED,
        HAS_BIAS, WEIGHT_ON_INPUT, EVEN_K, EVEN_N, W_TMA, DOT_PRECISION, BLOCK_M, BLOCK_N,
        BLOCK_K,
    )


@triton.jit
def _gemm1_rows(
    hidden_ptr, w13_ptr, w13_desc, b13_ptr, topk_weights_ptr, inter_ptr, pairs, row_ok,
    out_rows, expert, pid_n, H, I, top_k, stride_hm, stride_we, stride_wn, stride_be,
    stride_im, alpha, limit,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    W_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The BLOCK_M pairs `pairs` of one expert (those not `row_ok` are padding: never
    stored) × BLOCK_N intermediate columns, each written to its row `out_rows` (int64) of
    `inter`: its plan slot (`_gemm1_tile`)."""
    tokens = tl.where(row_ok, pairs // top_k, 0).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = hidden_ptr + tokens[:, None] * stride_hm + offs_k[None, :]
    w_base = w13_ptr + expert.to(tl.int64) * stride_we
    g_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    u_ptrs = g_ptrs + I * stride_wn
    g_row = expert * (I * 2 if GATED else I) + pid_n * BLOCK_N  # rows of the [E*N1, H] view
    u_row = g_row + I

    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Padding rows read token 0 (a valid row) unmasked: a dot's output row depends only on
    # its own input row, and padding rows are never stored.
    for k0 in range(0, H, BLOCK_K):
        a = _row_tile(a_ptrs, k0, offs_k, H, EVEN_K)
        g = _weight_tile(g_ptrs, w13_desc, g_row, k0, col_ok, offs_k, H, EVEN_K, EVEN_N, W_TMA)
        gate = tl.dot(a, g, gate, input_precision=DOT_PRECISION)
        if GATED:
            u = _weight_tile(u_ptrs, w13_desc, u_row, k0, col_ok, offs_k, H, EVEN_K, EVEN_N,
                             W_TMA)
            up = tl.dot(a, u, up, input_precision=DOT_PRECISION)
            u_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K

    if WEIGHT_ON_INPUT:
        w = tl.load(topk_weights_ptr + pairs, mask=row_ok, other=0.0)
        gate = gate * w[:, None]
        up = up * w[:, None]
    result = _bias_and_activate(gate, up, b13_ptr, expert, offs_n, col_ok, I, stride_be, alpha,
                                limit, ACTIVATION, GATED, HAS_BIAS)

    out_ptrs = inter_ptr + out_rows[:, None] * stride_im + offs_n[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptrs, result.to(inter_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _gemm1_kernel(
    hidden_ptr,  # [M, H]
    w13_ptr,  # [E, N1, H]; N1 = 2I (gate rows, then up rows) or I (relu2)
    w13_desc,  # TMA descriptor of w13 as [E*N1, H] (used only when W_TMA)
    b13_ptr,  # [E, N1] (read only when HAS_BIAS)
    topk_weights_ptr,  # [M*k] fp32 (read only when WEIGHT_ON_INPUT)
    inter_ptr,  # [capacity, I], out
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
    W_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TAIL_M: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # divides H, I and the row strides (`_aligned`)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EXPERT_GROUPS: tl.constexpr,
    PERSISTENT: tl.constexpr = False,  # `moekit._persistent_gemm1` (no tail tiles)
    FLATTEN: tl.constexpr = False,
):
    """One program: one row tile (one expert) × BLOCK_N intermediate columns; a tail tile
    (TAIL_M) computes only its TAIL_M rows. Tiles in `_tile_of`'s order, or with
    EXPERT_GROUPS in `_expert_tile_of`'s. PERSISTENT: each program a contiguous run of
    those tiles (`_run_of`)."""
    H = _aligned(H, ROW_ALIGN)
    I = _aligned(I, ROW_ALIGN)
    stride_hm = _aligned(stride_hm, ROW_ALIGN)
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
            _gemm1_tile(
                hidden_ptr, w13_ptr, w13_desc, b13_ptr, topk_weights_ptr, inter_ptr,
                sorted_pairs_ptr, first_slot, expert, pid_n, num_pairs, H, I, top_k,
                stride_hm, stride_we, stride_wn, stride_be, stride_im, alpha, limit,
                ACTIVATION, GATED, HAS_BIAS, WEIGHT_ON_INPUT, EVEN_K, EVEN_N, W_TMA,
                DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )
        return
    pid_m, pid_n = _ordered_tile_of(tl.program_id(0), num_blocks, tl.cdiv(I, BLOCK_N), tiles_ptr,
                                    block_experts_ptr, expert_offsets_ptr, GROUP_M,
                                    EXPERT_GROUPS, TAIL_M, BLOCK_M)
    first_slot, expert, is_tail = _work_tile(tiles_ptr, block_experts_ptr, pid_m, BLOCK_M,
                                             TAIL_M)
    if expert < 0:
        return
    # The same tile code at two heights; a constexpr TAIL_M = 0 compiles only the first.
    if TAIL_M and is_tail:
        _gemm1_tile(
            hidden_ptr, w13_ptr, w13_desc, b13_ptr, topk_weights_ptr, inter_ptr,
            sorted_pairs_ptr, first_slot, expert, pid_n, num_pairs, H, I, top_k, stride_hm,
            stride_we, stride_wn, stride_be, stride_im, alpha, limit, ACTIVATION, GATED,
            HAS_BIAS, WEIGHT_ON_INPUT, EVEN_K, EVEN_N, W_TMA, DOT_PRECISION, TAIL_M,
            BLOCK_N, BLOCK_K,
        )
    else:
        _gemm1_tile(
            hidden_ptr, w13_ptr, w13_desc, b13_ptr, topk_weights_ptr, inter_ptr,
            sorted_pairs_ptr, first_slot, expert, pid_n, num_pairs, H, I, top_k, stride_hm,
            stride_we, stride_wn, stride_be, stride_im, alpha, limit, ACTIVATION, GATED,
            HAS_BIAS, WEIGHT_ON_INPUT, EVEN_K, EVEN_N, W_TMA, DOT_PRECISION, BLOCK_M,
            BLOCK_N, BLOCK_K,
        )


@triton.jit
def _gemm2_tile(
    inter_ptr, inter_desc, w2_ptr, w2_desc, b2_ptr, topk_weights_ptr, pair_out_ptr,
    sorted_pairs_ptr, expert, first_slot, rows, pid_n, num_pairs, H, I, stride_im, stride_we,
    stride_wn, stride_be, stride_om,
    WEIGHT_ON_OUTPUT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """BLOCK_M plan slots of `expert` from `first_slot` × BLOCK_N hidden columns, written to
    their pairs' rows; `inter_desc` (TMA) has BLOCK_M-row boxes. With MASK_ROWS only the
    first `rows` slots are the tile's (TMA only: the descriptor bounds the other loads)."""
    slots = first_slot + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    # Padding slots of `inter` hold whatever was there; as in GEMM1 they only reach their
    # own (unstored) output rows, so the loads stay unmasked along M.
    acc = _gemm2_sums(inter_ptr, inter_desc, w2_ptr, w2_desc, slots.to(tl.int64), first_slot,
                      expert, pid_n, H, I, stride_im, stride_we, stride_wn, EVEN_K, EVEN_N, TMA,
                      DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if MASK_ROWS:
        pairs = tl.load(sorted_pairs_ptr + slots, mask=tl.arange(0, BLOCK_M) < rows,
                        other=num_pairs)
    else:
        pairs = tl.load(sorted_pairs_ptr + slots)
    _gemm2_store(acc, b2_ptr, topk_weights_ptr, pair_out_ptr, pairs, pairs < num_pairs,
                 expert, offs_n, col_ok, stride_be, stride_om, WEIGHT_ON_OUTPUT, HAS_BIAS)


@triton.jit
def _gemm2_sums(inter_ptr, inter_desc, w2_ptr, w2_desc, in_rows, first_slot, expert, pid_n, H,
                I, stride_im, stride_we, stride_wn, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """GEMM2's float32 [BLOCK_M, BLOCK_N] sums: `inter` rows `in_rows` (int64; with TMA the
    BLOCK_M rows from `first_slot`) × column tile `pid_n` of w2[expert]ᵀ."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + in_rows[:, None] * stride_im + offs_k[None, :]
    w_base = w2_ptr + expert.to(tl.int64) * stride_we
    b_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    w_row = expert * H + pid_n * BLOCK_N  # rows of the [E*H, I] view

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if TMA:
            a = inter_desc.load([first_slot, k0])
        else:
            a = _row_tile(a_ptrs, k0, offs_k, I, EVEN_K)
        b = _weight_tile(b_ptrs, w2_desc, w_row, k0, col_ok, offs_k, I, EVEN_K, EVEN_N, TMA)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def _gemm2_store(acc, b2_ptr, topk_weights_ptr, pair_out_ptr, pairs, row_ok, expert, offs_n,
                 col_ok, stride_be, stride_om, WEIGHT_ON_OUTPUT: tl.constexpr,
                 HAS_BIAS: tl.constexpr):
    """GEMM2's epilogue: + b2[expert], × each pair's router weight, each row stored to its
    pair's row of `pair_out` (rows not `row_ok` are padding)."""
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
def _gemm2_work_tile(
    inter_ptr, inter_desc, w2_ptr, w2_desc, b2_ptr, topk_weights_ptr, pair_out_ptr,
    sorted_pairs_ptr, block_experts_ptr, tiles_ptr, pid_m, pid_n, num_pairs, H, I, stride_im,
    stride_we, stride_wn, stride_be, stride_om,
    WEIGHT_ON_OUTPUT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TAIL_M: tl.constexpr, PERSISTENT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Row tile `pid_m` (`_work_tile`) × column tile `pid_n`.

    A tail tile is computed TAIL_M rows high, except in the persistent loop: there it
    runs at full height with its stores masked, since a second tile shape in the loop
    body stops the compiler from overlapping one tile's epilogue with the next's loads
    (measured 2–12% slower); its loads past the tile are bounded by the TMA descriptors
    (the persistent loop is TMA-only). Elsewhere a tail goes by pointer (`inter_desc` has
    BLOCK_M-row boxes). A row tile past the last run (only in a one-tile-per-program grid,
    sized for the worst case) does nothing.
    """
    first_slot, expert, is_tail = _work_tile(tiles_ptr, block_experts_ptr, pid_m, BLOCK_M,
                                             TAIL_M)
    if PERSISTENT or expert >= 0:
        if TAIL_M and PERSISTENT:
            tl.static_assert(TMA, "the persistent loop reads inter through TMA")
            rows = tl.where(is_tail, TAIL_M, BLOCK_M)
            _gemm2_tile(
                inter_ptr, inter_desc, w2_ptr, w2_desc, b2_ptr, topk_weights_ptr,
                pair_out_ptr, sorted_pairs_ptr, expert, first_slot, rows, pid_n, num_pairs, H,
                I, stride_im, stride_we, stride_wn, stride_be, stride_om, WEIGHT_ON_OUTPUT,
                HAS_BIAS, EVEN_K, EVEN_N, TMA, DOT_PRECISION, True, BLOCK_M, BLOCK_N, BLOCK_K,
            )
        elif TAIL_M and is_tail:
            _gemm2_tile(
                inter_ptr, inter_desc, w2_ptr, w2_desc, b2_ptr, topk_weights_ptr,
                pair_out_ptr, sorted_pairs_ptr, expert, first_slot, TAIL_M, pid_n, num_pairs,
                H, I, stride_im, stride_we, stride_wn, stride_be, stride_om, WEIGHT_ON_OUTPUT,
                HAS_BIAS, EVEN_K, EVEN_N, False, DOT_PRECISION, False, TAIL_M, BLOCK_N, BLOCK_K,
            )
        else:
            _gemm2_tile(
                inter_ptr, inter_desc, w2_ptr, w2_desc, b2_ptr, topk_weights_ptr,
                pair_out_ptr, sorted_pairs_ptr, expert, first_slot, BLOCK_M, pid_n, num_pairs,
                H, I, stride_im, stride_we, stride_wn, stride_be, stride_om, WEIGHT_ON_OUTPUT,
                HAS_BIAS, EVEN_K, EVEN_N, TMA, DOT_PRECISION, False, BLOCK_M, BLOCK_N, BLOCK_K,
            )


@triton.jit
def _gemm2_kernel(
    inter_ptr,  # [capacity, I]
    inter_desc,  # TMA descriptor of inter, BLOCK_M-row boxes (used only when TMA)
    w2_ptr,  # [E, H, I]
    w2_desc,  # TMA descriptor of w2 as [E*H, I] (used only when TMA)
    b2_ptr,  # [E, H] (read only when HAS_BIAS)
    topk_weights_ptr,  # [M*k] fp32
    pair_out_ptr,  # [M*k, H], out
    sorted_pairs_ptr,  # [capacity] int32
    block_experts_ptr,  # [capacity / plan rows] int32
    expert_offsets_ptr,  # [E + 1] int32 (read only when PERSISTENT or EXPERT_GROUPS)
    tiles_ptr,  # [num_blocks + 1] int32 work list, then its length (read only when TAIL_M)
    num_experts,
    num_pairs,
    num_blocks,  # row tiles of the grid: plan blocks, or the work list's length
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
    TMA: tl.constexpr,
    PERSISTENT: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TAIL_M: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # divides H, I and the row strides (`_aligned`)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EXPERT_GROUPS: tl.constexpr,
):
    """Row tiles (one expert each) × BLOCK_N hidden columns, in `_tile_of`'s order or with
    EXPERT_GROUPS in `_expert_tile_of`'s.

    One tile per program, or (PERSISTENT) NUM_PROGRAMS programs striding over the tiles
    of the row tiles in use, which lets the compiler overlap a tile's epilogue with the
    next tile's loads; the count comes from the plan (or the work list) on the GPU, so no
    host sync.
    """
    H = _aligned(H, ROW_ALIGN)
    I = _aligned(I, ROW_ALIGN)
    stride_im = _aligned(stride_im, ROW_ALIGN)
    stride_we = _aligned(stride_we, ROW_ALIGN)
    stride_wn = _aligned(stride_wn, ROW_ALIGN)
    stride_om = _aligned(stride_om, ROW_ALIGN)
    num_n = tl.cdiv(H, BLOCK_N)
    if PERSISTENT:
        if TAIL_M:
            used = tl.load(tiles_ptr + num_blocks)
        else:
            used = tl.load(expert_offsets_ptr + num_experts) // BLOCK_M
        for tile in tl.range(tl.program_id(0), used * num_n, NUM_PROGRAMS, flatten=True):
            pid_m, pid_n = _ordered_tile_of(tile, used, num_n, tiles_ptr, block_experts_ptr,
                                            expert_offsets_ptr, GROUP_M, EXPERT_GROUPS, TAIL_M,
                                            BLOCK_M)
            _gemm2_work_tile(
                inter_ptr, inter_desc, w2_ptr, w2_desc, b2_ptr,
                topk_weights_ptr, pair_out_ptr, sorted_pairs_ptr, block_experts_ptr, tiles_ptr,
                pid_m, pid_n, num_pairs, H, I, stride_im, stride_we, stride_wn, stride_be,
                stride_om, WEIGHT_ON_OUTPUT, HAS_BIAS, EVEN_K, EVEN_N, TMA, DOT_PRECISION,
                TAIL_M, True, BLOCK_M, BLOCK_N, BLOCK_K,
            )
    else:
        pid_m, pid_n = _ordered_tile_of(tl.program_id(0), num_blocks, num_n, tiles_ptr,
                                        block_experts_ptr, expert_offsets_ptr, GROUP_M,
                                        EXPERT_GROUPS, TAIL_M, BLOCK_M)
        _gemm2_work_tile(
            inter_ptr, inter_desc, w2_ptr, w2_desc, b2_ptr, topk_weights_ptr,
            pair_out_ptr, sorted_pairs_ptr, block_experts_ptr, tiles_ptr, pid_m, pid_n,
            num_pairs, H, I, stride_im, stride_we, stride_wn, stride_be, stride_om,
            WEIGHT_ON_OUTPUT, HAS_BIAS, EVEN_K, EVEN_N, TMA, DOT_PRECISION, TAIL_M, False,
            BLOCK_M, BLOCK_N, BLOCK_K,
        )


@triton.jit
def _combine_kernel(
    pair_out_ptr,  # [M*k, H], or [capacity, H] in plan order when BY_SLOT; [PARTS, M*k, H]
    topk_ids_ptr,  # [M*k] int32
    pair_slots_ptr,  # [M*k] int32: each pair's plan slot (read only when BY_SLOT)
    out_ptr,  # [M, H], out
    H,
    num_experts,
    stride_pm,
    stride_pp,  # between pair_out's parts (read only when PARTS > 1)
    stride_om,
    TOP_K: tl.constexpr,
    BY_SLOT: tl.constexpr,
    PARTS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid (M, H-tiles): one token's BLOCK_H output columns, summed over its k slots.
    A pair's row is pair_out[pair], or with BY_SLOT pair_out[pair_slots[pair]] (GEMM2
    stored whole plan-order tiles); with PARTS > 1 the sum of its PARTS partial rows
    (the fp8 GEMM2's K parts), in part order."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token * TOP_K + j
        e = tl.load(topk_ids_ptr + pair)
        valid = (e >= 0) & (e < num_experts)
        row_index = pair
        if BY_SLOT:
            row_index = tl.load(pair_slots_ptr + pair, mask=valid, other=0).to(tl.int64)
        for p in tl.static_range(PARTS):
            row = tl.load(pair_out_ptr + p * stride_pp + row_index * stride_pm + offs,
                          mask=col_ok & valid, other=0.0)
            acc += row.to(tl.float32)
    tl.store(out_ptr + token * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=col_ok)
