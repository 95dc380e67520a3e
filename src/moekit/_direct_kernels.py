"""Triton kernels of the direct (plan-free) experts path, for a handful of tokens.

    _direct_gemm1_kernel  grid (M*k pairs, I-tiles): the pair's token row × w13[e]ᵀ, + bias,
                          activation; writes `inter` [M*k, I] in pair order
    _direct_gemm2_kernel  grid (M × parts, H-tiles): Σ_j weight_j · (inter[m*k + j] ×
                          w2[e_j]ᵀ + b2) over a part of the token's slots, in order; the
                          parts added in order by the token's last program (`_sum_parts`),
                          so the combine is fused and deterministic

At decode a token reaches k experts with one row each, so the GEMMs stream weights for
single rows. They still run as tensor-core dots on a ROWS-row tile whose first row is the
real one (the rest are zeros and never stored), so their loads go through the
pipeliner's shared-memory stages: CUDA-core products of register tiles measured up to
1.13× (GEMM1) and 1.36× (GEMM2) slower on an H100 (bench/NOTES.md, direct path).
Ids are read straight from `topk_ids`, so no dispatch plan is built, and no `pair_out` is
written and re-read by a combine: two launches instead of four.

Pairs that share an expert read its weights once per pair; consecutive programs of the
grid are the pairs (or tokens) of one column tile, so such re-reads mostly come from
L2. A pair whose id is outside [0, E) is skipped by both kernels: GEMM1 leaves its
`inter` row unwritten and GEMM2 masks every load of it, so the row's contents never
matter. int64 ids are compared with E before they narrow to int32, so none (2**32 + 1,
say) aliases onto a real expert. Row offsets are 64-bit, offsets within a weight tile
32-bit.
"""

import triton
import triton.language as tl

from moekit._experts_kernels import _aligned, _bias_and_activate

ROWS = tl.constexpr(16)  # the dot's row tile: the smallest tensor-core M (row 0 real here;
# the fp8 GEMM2 fills a row per slot of its part)


@triton.jit
def _slot_row(ptrs, row, k0, offs_k, K, valid, EVEN_K: tl.constexpr):
    """A [ROWS, BLOCK_K] tile whose row `row` holds BLOCK_K values of the row at `ptrs`
    from column k0 (zeros where K ends or not `valid`), the other rows zeros."""
    rows = tl.arange(0, ROWS)[:, None]
    mask = (rows == row) & valid
    if not EVEN_K:
        mask = mask & (offs_k + k0 < K)[None, :]
    return tl.load(ptrs + rows * 0 + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def _next_step(slot, k0, K, BLOCK_K: tl.constexpr):
    """The step after (slot, k0) in a loop over a part's slots and each slot's K tiles: the
    slot's next tile, or the next slot's first. Carried from step to step, so no step
    divides by the K-steps (an integer division in every step of the GEMM2 loops)."""
    k0 += BLOCK_K
    wrap = k0 >= K
    return tl.where(wrap, slot + 1, slot), tl.where(wrap, 0, k0)


@triton.jit
def _first_row(ptrs, k0, offs_k, K, valid, EVEN_K: tl.constexpr):
    """`_slot_row` into row 0."""
    return _slot_row(ptrs, 0, k0, offs_k, K, valid, EVEN_K)


@triton.jit
def _weight_cols(ptrs, k0, col_ok, offs_k, K, valid, EVEN_K: tl.constexpr,
                 EVEN_N: tl.constexpr, CHECK: tl.constexpr):
    """A [BLOCK_K, BLOCK_N] tile of a weight stored [N, K]; with CHECK the scalar `valid`
    masks the whole tile."""
    mask = (col_ok[None, :] | EVEN_N) & ((offs_k + k0 < K)[:, None] | EVEN_K)
    if CHECK:
        mask = mask & valid
    if EVEN_K and EVEN_N and not CHECK:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _gate_up_cols(w13_ptr, expert, offs_n, offs_k, I, stride_we, stride_wn):
    """Pointers of an expert's gate and up weight tiles [BLOCK_K, BLOCK_N] at K = 0 (the up
    rows start I rows after the gate rows)."""
    g_ptrs = (w13_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
              + offs_k[:, None])
    return g_ptrs, g_ptrs + I * stride_wn


@triton.jit
def _token_slots(topk_ids_ptr, token, num_experts, TOP_K: tl.constexpr, SLOTS: tl.constexpr):
    """A token's k slots: (slot numbers [SLOTS], valid [SLOTS], expert ids [SLOTS]); a slot
    past k or with an id outside [0, E) is not valid and reads id 0."""
    slots = tl.arange(0, SLOTS)
    slot_ok = slots < TOP_K
    slot_ids = tl.load(topk_ids_ptr + token * TOP_K + slots, mask=slot_ok, other=-1)
    slot_ok = slot_ok & (slot_ids >= 0) & (slot_ids < num_experts)  # before narrowing int64
    return slots, slot_ok, tl.where(slot_ok, slot_ids, 0).to(tl.int32)


@triton.jit
def _clear_arrivals(arrivals_ptr, pair, pid_n, top_k, tiles_per_token):
    """In a token's first GEMM1 program (its slot 0, column tile 0), zero the token's
    arrival counters (`_sum_parts`) for the GEMM2 that follows."""
    if (pid_n == 0) & (pair % top_k == 0):
        row = arrivals_ptr + (pair // top_k) * tiles_per_token
        for t0 in range(0, tiles_per_token, 128):
            offs = t0 + tl.arange(0, 128)
            tl.store(row + offs, tl.zeros([128], dtype=tl.int32), mask=offs < tiles_per_token)


@triton.jit
def _part_slots(topk_ids_ptr, token, part, num_experts, TOP_K: tl.constexpr,
                SLOTS: tl.constexpr, PER_PART: tl.constexpr):
    """`_token_slots` with only part `part`'s PER_PART slots valid; also its first slot."""
    slots, slot_ok, slot_ids = _token_slots(topk_ids_ptr, token, num_experts, TOP_K, SLOTS)
    first = part * PER_PART
    slot_ok = slot_ok & (slots >= first) & (slots < first + PER_PART)
    return slots, slot_ok, tl.where(slot_ok, slot_ids, 0), first


@triton.jit
def _sum_parts(acc, out_ptr, partials_ptr, arrivals_ptr, token, part, pid_n, offs_n, col_ok,
               H, stride_om, PARTS: tl.constexpr):
    """Store row 0 of `acc` — the token's sum over one part of its slots — as its output.

    With one part that is the whole sum. Otherwise the part goes to `partials`
    [M*PARTS, H] (float32) and the token's arrival counter for this column tile is
    bumped; the program that arrives last adds the PARTS rows in part order, so the sum
    is the same whatever the order the programs ran in (bitwise deterministic).
    """
    rows = tl.arange(0, ROWS)[:, None]
    first_row = (rows == 0) & col_ok[None, :]
    out_row = out_ptr + token.to(tl.int64) * stride_om
    if PARTS == 1:
        tl.store(out_row + rows * 0 + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=first_row)
    else:
        parts_row = partials_ptr + (token * PARTS).to(tl.int64) * H + offs_n
        tl.store(parts_row[None, :] + part * H + rows * 0, acc, mask=first_row)
        # Every thread's stores are issued before the (acquire-release, GPU-scope) arrival.
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr + token * tl.num_programs(1) + pid_n, 1)
        if arrived == PARTS - 1:
            total = tl.load(parts_row, mask=col_ok, other=0.0, cache_modifier=".cg")
            for p in tl.static_range(1, PARTS):
                total += tl.load(parts_row + p * H, mask=col_ok, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out_row + offs_n, total.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _direct_gemm1_kernel(
    hidden_ptr,  # [M, H]
    w13_ptr,  # [E, N1, H]; N1 = 2I (gate rows, then up rows) or I (relu2)
    b13_ptr,  # [E, N1] (read only when HAS_BIAS)
    topk_ids_ptr,  # [M*k] int32, or int64 (checked against E before narrowing)
    topk_weights_ptr,  # [M*k] fp32 or 16-bit (read only when WEIGHT_ON_INPUT)
    inter_ptr,  # [M*k, I], out
    arrivals_ptr,  # [M, tiles_per_token] int32: GEMM2's counters, zeroed (CLEAR_ARRIVALS)
    num_experts,
    H,
    I,
    top_k,
    tiles_per_token,
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
    CLEAR_ARRIVALS: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # divides H, I and the row strides (`_aligned`)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: one pair × BLOCK_N intermediate columns. With CLEAR_ARRIVALS a
    token's first program also zeroes GEMM2's arrival counters of that token (a launch
    fewer than a separate memset)."""
    H = _aligned(H, ROW_ALIGN)
    I = _aligned(I, ROW_ALIGN)
    stride_hm = _aligned(stride_hm, ROW_ALIGN)
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
    offs_k = tl.arange(0, BLOCK_K)
    x_ptr = hidden_ptr + token * stride_hm
    g_ptrs, u_ptrs = _gate_up_cols(w13_ptr, expert, offs_n, offs_k, I, stride_we, stride_wn)

    gate = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        x = _first_row(x_ptr + k0, k0, offs_k, H, True, EVEN_K)
        g = _weight_cols(g_ptrs, k0, col_ok, offs_k, H, True, EVEN_K, EVEN_N, False)
        gate = tl.dot(x, g, gate, input_precision=DOT_PRECISION)
        if GATED:
            u = _weight_cols(u_ptrs, k0, col_ok, offs_k, H, True, EVEN_K, EVEN_N, False)
            up = tl.dot(x, u, up, input_precision=DOT_PRECISION)
            u_ptrs += BLOCK_K
        g_ptrs += BLOCK_K

    if WEIGHT_ON_INPUT:
        w = tl.load(topk_weights_ptr + pair).to(tl.float32)
        gate = gate * w
        up = up * w
    result = _bias_and_activate(gate, up, b13_ptr, expert, offs_n, col_ok, I, stride_be, alpha,
                                limit, ACTIVATION, GATED, HAS_BIAS)
    rows = tl.arange(0, ROWS)[:, None]
    out_ptrs = inter_ptr + pair.to(tl.int64) * stride_im + rows * 0 + offs_n[None, :]
    tl.store(out_ptrs, result.to(inter_ptr.dtype.element_ty), mask=(rows == 0) & col_ok[None, :])


@triton.jit
def _direct_gemm2_kernel(
    inter_ptr,  # [M*k, I]
    w2_ptr,  # [E, H, I]
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
    stride_we,
    stride_wn,
    stride_be,
    stride_om,
    WEIGHT_ON_OUTPUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TOP_K: tl.constexpr,
    SLOTS: tl.constexpr,  # TOP_K rounded up to a power of two
    PER_PART: tl.constexpr,  # slots one program sums
    PARTS: tl.constexpr,  # programs per token and column tile: ceil(TOP_K / PER_PART)
    ROW_ALIGN: tl.constexpr,  # divides H, I and the row strides (`_aligned`)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: one token × BLOCK_N hidden columns, summed over PER_PART of its slots
    (`_sum_parts` adds the PARTS programs' sums).

    The slot and K loops are one loop (`_next_step`), so the next slot's weight tiles are
    in flight while this slot finishes. Each step's product is scaled by its slot's
    router weight in fp32 and added; a skipped slot's weight and loads are zero.
    (Each slot's products in a row of their own, the router weights applied after the
    loop as in the fp8 GEMM2, measured the same on an H200: bench/NOTES.md, session 11.)
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
    # The part's ids and weights, read once: inside the loop a weight tile's address
    # then depends on no load, so the pipeliner can issue tiles of later slots early.
    slots, slot_ok, slot_ids, first = _part_slots(topk_ids_ptr, token, part, num_experts,
                                                  TOP_K, SLOTS, PER_PART)
    if WEIGHT_ON_OUTPUT:
        slot_scales = tl.load(topk_weights_ptr + token * TOP_K + slots, mask=slot_ok,
                              other=0.0).to(tl.float32)
    else:
        slot_scales = tl.where(slot_ok, 1.0, 0.0)

    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    slot = first
    k0 = first * 0
    for _ in range(0, PER_PART * k_steps):
        this = slots == slot
        expert = tl.sum(tl.where(this & slot_ok, slot_ids, 0))
        valid = tl.sum(tl.where(this & slot_ok, 1, 0)) > 0
        pair = token * TOP_K + slot
        a = _first_row(inter_ptr + pair.to(tl.int64) * stride_im + k0, k0, offs_k, I, valid,
                       EVEN_K)
        b_ptrs = w2_ptr + expert.to(tl.int64) * stride_we + k0 + cols
        b = _weight_cols(b_ptrs, k0, col_ok, offs_k, I, valid, EVEN_K, EVEN_N, True)
        part_dot = tl.dot(a, b, input_precision=DOT_PRECISION)
        acc += part_dot * tl.sum(tl.where(this, slot_scales, 0.0))
        slot, k0 = _next_step(slot, k0, I, BLOCK_K)

    if HAS_BIAS:
        for j in tl.static_range(PER_PART):
            this = slots == first + j
            expert = tl.sum(tl.where(this & slot_ok, slot_ids, 0))
            valid = tl.sum(tl.where(this & slot_ok, 1, 0)) > 0
            b_ptrs = b2_ptr + expert.to(tl.int64) * stride_be + offs_n
            bias = tl.load(b_ptrs, mask=col_ok & valid, other=0.0).to(tl.float32)
            acc += (bias * tl.sum(tl.where(this, slot_scales, 0.0)))[None, :]
    _sum_parts(acc, out_ptr, partials_ptr, arrivals_ptr, token, part, pid_n, offs_n, col_ok,
               H, stride_om, PARTS)
