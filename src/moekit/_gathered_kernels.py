"""Triton kernels of the gathered experts path: the plan path's GEMMs, without the plan.

    _gathered_gemm1_kernel  grid (row steps × I-tiles): program (j, n) takes the j-th step
                            of BLOCK_M pairs routed to one expert (the experts hit in
                            turn), read straight from topk_ids, × w13[e]ᵀ (+b13),
                            activation; writes `inter` [M*k, I] in pair order
    _gathered_gemm2_kernel  grid (row steps × H-tiles): the same pairs' `inter` rows ×
                            w2[e]ᵀ (+b2), × router weight → `pair_out` [M*k, H]; a token's
                            rows of the column tile are then added, in slot order, by the
                            program that stores the last of them (`_sum_finished_tokens`)

The plan path spends two of its four launches at decode on the plan and the combine, each
a few µs of a layer that streams its weights in tens. Here every program finds its expert
and rows itself from the ≤ M·k ids (a histogram of the ids numbers the experts' steps,
`_program_step`; prefix sums, a chunk of ids at a time for many pairs, rank an expert's
pairs, `_rows_of`), and GEMM2 does the combine's sums, so the layer is two launches. One
step a program, not a loop over an expert's steps: a loop around the pipelined K loop took the
16-bit GEMM1 from 96 registers to 255 (sm_90 `ptxas -v`). The tiles' K loops and
epilogues are the plan path's (`_gemm1_rows`, `_gemm2_sums`, `_gemm2_store`), and the sums
are the combine's (float32, slot order), so the output equals the plan path's bitwise at
the same tiles.

Ids outside [0, E) (dropped pairs, other ranks' experts) are in no expert's rows and in no
token's count; int64 ids are compared as they are, so none aliases onto a real expert. A
token with no valid id gets zeros from GEMM2's programs before they look for work.
"""

import triton
import triton.language as tl

from moekit._experts_kernels import _aligned, _gemm1_rows, _gemm2_store, _gemm2_sums


@triton.jit
def _valid_ids(topk_ids_ptr, num_experts, num_pairs, PAIRS: tl.constexpr):
    """The ids of the M·k pairs as int32 [PAIRS] (PAIRS ≥ M·k, a power of two) and which
    are valid: real pairs with an id in [0, E), checked before narrowing int64 ids."""
    offs = tl.arange(0, PAIRS)
    ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1)
    valid = (ids >= 0) & (ids < num_experts)
    return tl.where(valid, ids, 0).to(tl.int32), valid


@triton.jit
def _program_step(topk_ids_ptr, num_experts, num_pairs, num_n, PAIRS: tl.constexpr,
                  EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's work in a grid of (row steps × num_n column tiles): the experts hit,
    in ascending order, each cut into steps of BLOCK_M of its pairs, are numbered in
    turn (a histogram of the ids counts each expert's pairs). Returns (its step's number,
    its column tile, the ids and their validity as `_valid_ids` gives them, the step's
    expert, the rank of its first pair among the expert's, whether there is such a step —
    not past the last)."""
    step = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) - step * num_n
    ids, valid = _valid_ids(topk_ids_ptr, num_experts, num_pairs, PAIRS)
    counts = tl.histogram(ids, EXPERTS, mask=valid)
    steps = (counts + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(steps, 0)
    this = (ends - steps <= step) & (step < ends)  # one expert at most
    expert = tl.sum(tl.where(this, tl.arange(0, EXPERTS), 0), 0)
    first = (step - tl.sum(tl.where(this, ends - steps, 0), 0)) * BLOCK_M
    return step, pid_n, ids, valid, expert, first, tl.sum(this.to(tl.int32), 0) > 0


# `_rows_of` matches ranks to pairs in [BLOCK_M, CHUNK] comparisons of at most this many
# values (one for 16 rows over M·k ≤ 256 pairs); past it, where one comparison would spill
# (552 bytes at 64 rows over 256 pairs, sm_90), it takes the ids CHUNK at a time, carrying
# the count of the expert's pairs before each chunk. (A bitonic sort of the ids instead is
# log²(PAIRS) / 2 compare-and-swap steps, several across warps, all before the first load.)
MATCH_MAX = tl.constexpr(4096)


@triton.jit
def _rows_of(topk_ids_ptr, num_pairs, ids, valid, expert, first, PAIRS: tl.constexpr,
             BLOCK_M: tl.constexpr):
    """The pairs routed to `expert` of ranks [first, first + BLOCK_M) among them (`first` a
    multiple of BLOCK_M ≤ PAIRS), in pair order: (pairs [BLOCK_M], row_ok [BLOCK_M]); a
    row past the expert's last pair reads pair 0 and is not ok. `ids` and `valid` are
    `_valid_ids`' (all PAIRS of them, used where one comparison holds them)."""
    wanted = first + tl.arange(0, BLOCK_M)
    if BLOCK_M * PAIRS <= MATCH_MAX:
        offs = tl.arange(0, PAIRS)
        mine = valid & (ids == expert)
        places = tl.cumsum(mine.to(tl.int32), 0) - 1
        chosen = mine[None, :] & (places[None, :] == wanted[:, None])  # [BLOCK_M, PAIRS]
        pairs = tl.sum(tl.where(chosen, offs[None, :], 0), 1)
        return pairs, tl.sum(chosen.to(tl.int32), 1) > 0
    else:
        CHUNK: tl.constexpr = MATCH_MAX // BLOCK_M
        pairs = tl.zeros([BLOCK_M], dtype=tl.int32)
        found = tl.zeros([BLOCK_M], dtype=tl.int32)
        before = 0  # the expert's pairs in earlier chunks
        for c0 in range(0, PAIRS, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            # `expert` is in [0, E), so an id equal to it is valid (int64 ids compared whole)
            mine = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1) == expert
            places = before + tl.cumsum(mine.to(tl.int32), 0) - 1
            chosen = mine[None, :] & (places[None, :] == wanted[:, None])  # [BLOCK_M, CHUNK]
            pairs += tl.sum(tl.where(chosen, offs[None, :], 0), 1)
            found += tl.sum(chosen.to(tl.int32), 1)
            before += tl.sum(mine.to(tl.int32), 0)
        return pairs, found > 0


@triton.jit
def _zero_counters(counters_ptr, count):
    """This program's strided share of `count` int32 counters set to zero (GEMM1 zeroes
    GEMM2's arrival counters: a launch fewer than a memset)."""
    for c0 in range(tl.program_id(0) * 128, count, tl.num_programs(0) * 128):
        offs = c0 + tl.arange(0, 128)
        tl.store(counters_ptr + offs, tl.zeros([128], dtype=tl.int32), mask=offs < count)


@triton.jit
def _gathered_gemm1_kernel(
    hidden_ptr,  # [M, H]
    w13_ptr,  # [E, N1, H]; N1 = 2I (gate rows, then up rows) or I (relu2)
    b13_ptr,  # [E, N1] (read only when HAS_BIAS)
    topk_ids_ptr,  # [M*k] int32 or int64
    topk_weights_ptr,  # [M*k] fp32 or 16-bit (read only when WEIGHT_ON_INPUT)
    inter_ptr,  # [M*k, I], out
    arrivals_ptr,  # [M, H-tiles] int32: GEMM2's counters, zeroed here
    num_experts,
    num_pairs,
    H,
    I,
    top_k,
    arrival_count,  # M × GEMM2's column tiles
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
    ROW_ALIGN: tl.constexpr,  # divides H, I and the row strides (`_aligned`)
    PAIRS: tl.constexpr,  # M*k rounded up to a power of two, at least BLOCK_M
    EXPERTS: tl.constexpr,  # E rounded up to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: one row step (`_program_step`) × BLOCK_N intermediate columns; programs
    also zero GEMM2's arrival counters (`_zero_counters`)."""
    H = _aligned(H, ROW_ALIGN)
    I = _aligned(I, ROW_ALIGN)
    stride_hm = _aligned(stride_hm, ROW_ALIGN)
    stride_we = _aligned(stride_we, ROW_ALIGN)
    stride_wn = _aligned(stride_wn, ROW_ALIGN)
    stride_im = _aligned(stride_im, ROW_ALIGN)
    _zero_counters(arrivals_ptr, arrival_count)
    _, pid_n, ids, valid, expert, first, active = _program_step(
        topk_ids_ptr, num_experts, num_pairs, tl.cdiv(I, BLOCK_N), PAIRS, EXPERTS, BLOCK_M)
    if active:
        pairs, row_ok = _rows_of(topk_ids_ptr, num_pairs, ids, valid, expert, first, PAIRS,
                                 BLOCK_M)
        _gemm1_rows(
            hidden_ptr, w13_ptr, None, b13_ptr, topk_weights_ptr, inter_ptr, pairs, row_ok,
            pairs.to(tl.int64), expert, pid_n, H, I, top_k, stride_hm, stride_we, stride_wn,
            stride_be, stride_im, alpha, limit, ACTIVATION, GATED, HAS_BIAS, WEIGHT_ON_INPUT,
            EVEN_K, EVEN_N, False, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )


@triton.jit
def _zero_idle_tokens(valid, out_ptr, num_tokens, rank, ranks, pid_n, H, stride_om,
                      TOP_K: tl.constexpr, PAIRS: tl.constexpr, TOKENS: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Zero column tile `pid_n` of out's rows whose token has no valid id (no GEMM2
    program sums them), the tokens ≡ `rank` mod `ranks` of them; `valid` is
    `_valid_ids`' [PAIRS], TOKENS ≥ M a power of two."""
    per_token = tl.histogram(tl.arange(0, PAIRS) // TOP_K, TOKENS, mask=valid)
    tokens = tl.arange(0, TOKENS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    for token in range(rank, num_tokens, ranks):  # one step or none at decode
        if tl.sum(tl.where(tokens == token, per_token, 0), 0) == 0:
            row = tl.zeros([BLOCK_N], dtype=tl.int64) + token  # 64-bit row offsets
            tl.store(out_ptr + row * stride_om + offs_n,
                     tl.zeros([BLOCK_N], dtype=out_ptr.dtype.element_ty), mask=offs_n < H)


@triton.jit
def _sum_finished_tokens(pair_out_ptr, out_ptr, arrivals_ptr, topk_ids_ptr, pairs, row_ok,
                         pid_n, num_n, num_experts, H, stride_pm, stride_om,
                         TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr):
    """After this program stored its rows of `pair_out`: count each row's token arrived
    for this column tile; where that was the token's last valid slot, add the token's
    rows in slot order (float32, as `_combine_kernel`) into out. The sum is the same
    whichever program arrives last, so the result is bitwise deterministic."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    tokens = tl.where(row_ok, pairs // TOP_K, 0)
    # Every thread's stores are issued before the (acquire-release, GPU-scope) arrivals.
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals_ptr + tokens * num_n + pid_n, 1, mask=row_ok)
    slots = tl.arange(0, SLOTS)
    slot_ids = tl.load(topk_ids_ptr + tokens[:, None] * TOP_K + slots[None, :],
                       mask=row_ok[:, None] & (slots < TOP_K)[None, :], other=-1)
    slot_ok = (slot_ids >= 0) & (slot_ids < num_experts)
    last = row_ok & (arrived == tl.sum(slot_ok.to(tl.int32), 1) - 1)
    if tl.sum(last.to(tl.int32), 0) > 0:
        rows = tokens.to(tl.int64) * TOP_K
        total = tl.zeros([pairs.shape[0], BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            ok = last & (tl.sum(tl.where(slots[None, :] == j, slot_ok, False).to(tl.int32), 1)
                         > 0)
            row = tl.load(pair_out_ptr + (rows + j)[:, None] * stride_pm + offs_n[None, :],
                          mask=ok[:, None] & col_ok[None, :], other=0.0, cache_modifier=".cg")
            total += row.to(tl.float32)
        tl.store(out_ptr + tokens.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
                 total.to(out_ptr.dtype.element_ty), mask=last[:, None] & col_ok[None, :])


@triton.jit
def _gathered_gemm2_kernel(
    inter_ptr,  # [M*k, I]
    w2_ptr,  # [E, H, I]
    b2_ptr,  # [E, H] (read only when HAS_BIAS)
    topk_ids_ptr,  # [M*k] int32 or int64
    topk_weights_ptr,  # [M*k] fp32 or 16-bit (read only when WEIGHT_ON_OUTPUT)
    pair_out_ptr,  # [M*k, H], out: each pair's weighted row
    out_ptr,  # [M, H], out
    arrivals_ptr,  # [M, H-tiles] int32, zeroed by GEMM1
    num_experts,
    num_tokens,
    H,
    I,
    stride_im,
    stride_we,
    stride_wn,
    stride_be,
    stride_pm,
    stride_om,
    WEIGHT_ON_OUTPUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # divides H, I and the row strides (`_aligned`)
    TOP_K: tl.constexpr,
    SLOTS: tl.constexpr,  # TOP_K rounded up to a power of two
    PAIRS: tl.constexpr,  # M*k rounded up to a power of two, at least BLOCK_M
    EXPERTS: tl.constexpr,  # E rounded up to a power of two
    TOKENS: tl.constexpr,  # M rounded up to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
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
    if active:
        pairs, row_ok = _rows_of(topk_ids_ptr, num_tokens * TOP_K, ids, valid, expert, first,
                                 PAIRS, BLOCK_M)
        acc = _gemm2_sums(inter_ptr, None, w2_ptr, None, pairs.to(tl.int64), 0, expert, pid_n,
                          H, I, stride_im, stride_we, stride_wn, EVEN_K, EVEN_N, False,
                          DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _gemm2_store(acc, b2_ptr, topk_weights_ptr, pair_out_ptr, pairs, row_ok, expert, offs_n,
                     offs_n < H, stride_be, stride_pm, WEIGHT_ON_OUTPUT, HAS_BIAS)
        _sum_finished_tokens(pair_out_ptr, out_ptr, arrivals_ptr, topk_ids_ptr, pairs, row_ok,
                             pid_n, num_n, num_experts, H, stride_pm, stride_om, TOP_K, SLOTS,
                             BLOCK_N)
