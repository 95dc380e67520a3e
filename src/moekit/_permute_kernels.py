"""Triton kernels of permute/unpermute over the plan's contiguous grouped layout.

    _permute_kernel     grid (token sets + blocks, H-tiles)
                          token set: read ROWS hidden rows once, store each to its k slots
                          block:     zero the padding rows at the end of an expert's run
    _unpermute_kernel   grid (token sets, H-tiles)
                          out[m] = Σ_j w[m,j] · grouped[pair_slots[m*k+j]]

Both are pure row moves, so they live or die by memory traffic and width. permute is
token-major: each hidden row is read from DRAM once and written k times (a slot-major
gather would read it k times, and at prefill L2 cannot hold the rows between the k
reads). A program moves a [ROWS, BLOCK_H] tile, each thread 16 bytes at a time (the
host picks BLOCK_H, ROWS and the warps so a tile is whole 16-byte vectors per thread).
Row offsets are 64-bit (capacity·H and M·H can exceed 2^31); offsets inside a row
stay 32-bit.

permute copies bits: the host hands it integer views of the rows (int8/int16/int32), so
fp8, bf16, fp16 and fp32 rows share one kernel and nothing is ever rounded. unpermute
reads each pair's slot from the plan's inverse map; its k row loads have no store
between them, so they are all in flight before the first add, and the adds run in slot
order j = 0..k−1 in fp32 — deterministic, no atomics.
"""

import triton
import triton.language as tl


@triton.jit
def _scatter_rows(
    hidden_ptr, row_scales_ptr, pair_slots_ptr, grouped_ptr, grouped_scales_ptr,
    program, num_tokens, H, G, stride_hm, stride_gm, stride_sm, stride_gsm,
    TOP_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr,
    HAS_SCALES: tl.constexpr, EVEN_H: tl.constexpr,
):
    """ROWS tokens' BLOCK_H columns: one load, k stores (dropped pairs are skipped)."""
    tokens = program * ROWS + tl.arange(0, ROWS)
    tok_ok = tokens < num_tokens
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    if EVEN_H:
        mask = tok_ok[:, None]
    else:
        mask = tok_ok[:, None] & (cols < H)[None, :]
    src = hidden_ptr + tokens.to(tl.int64)[:, None] * stride_hm + cols[None, :]
    rows = tl.load(src, mask=mask, other=0, eviction_policy="evict_first")
    for j in tl.static_range(TOP_K):
        slots = tl.load(pair_slots_ptr + tokens * TOP_K + j, mask=tok_ok, other=-1)
        kept = slots >= 0
        dst = grouped_ptr + tl.maximum(slots, 0).to(tl.int64)[:, None] * stride_gm + cols[None, :]
        tl.store(dst, rows, mask=mask & kept[:, None])
    if HAS_SCALES:
        if tl.program_id(1) == 0:
            g = tl.arange(0, BLOCK_G)
            smask = tok_ok[:, None] & (g < G)[None, :]
            scales = tl.load(row_scales_ptr + tokens.to(tl.int64)[:, None] * stride_sm
                             + g[None, :], mask=smask, other=0.0)
            # Own names: Triton types a variable once per scope, and `dst` above points
            # at hidden's dtype, these at the scales' fp32.
            for j in tl.static_range(TOP_K):
                scale_slots = tl.load(pair_slots_ptr + tokens * TOP_K + j, mask=tok_ok, other=-1)
                scale_dst = (grouped_scales_ptr + tl.maximum(scale_slots, 0).to(tl.int64)[:, None]
                             * stride_gsm + g[None, :])
                tl.store(scale_dst, scales, mask=smask & (scale_slots >= 0)[:, None])


@triton.jit
def _zero_padding(
    sorted_pairs_ptr, expert_offsets_ptr, grouped_ptr, grouped_scales_ptr,
    block, num_pairs, num_experts, H, G, stride_gm, stride_gsm,
    BLOCK_M: tl.constexpr, PAD_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_G: tl.constexpr, HAS_SCALES: tl.constexpr, EVEN_H: tl.constexpr,
):
    """Zeros in BLOCK_H columns of block `block`'s padding rows (scales too, on tile 0).

    The plan pads each expert's run at its end, so a block's padding is its last `npad`
    rows (npad = sentinels in the block); only the last block of a run has any.
    """
    start = block * BLOCK_M
    used = tl.load(expert_offsets_ptr + num_experts)
    pairs = tl.load(sorted_pairs_ptr + start + tl.arange(0, BLOCK_M))
    npad = tl.sum((pairs >= num_pairs).to(tl.int32), axis=0)
    npad = tl.where(start < used, npad, 0)  # the tail past the last run is nobody's
    end = start + BLOCK_M
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    zeros = tl.zeros([PAD_ROWS, BLOCK_H], dtype=grouped_ptr.dtype.element_ty)
    g = tl.arange(0, BLOCK_G)
    for first in range(end - npad, end, PAD_ROWS):
        r = first + tl.arange(0, PAD_ROWS)
        row_ok = r < end
        if EVEN_H:
            mask = row_ok[:, None]
        else:
            mask = row_ok[:, None] & (cols < H)[None, :]
        tl.store(grouped_ptr + r.to(tl.int64)[:, None] * stride_gm + cols[None, :], zeros,
                 mask=mask)
        if HAS_SCALES:
            if tl.program_id(1) == 0:
                tl.store(grouped_scales_ptr + r.to(tl.int64)[:, None] * stride_gsm + g[None, :],
                         tl.zeros([PAD_ROWS, BLOCK_G], dtype=tl.float32),
                         mask=row_ok[:, None] & (g < G)[None, :])


@triton.jit
def _permute_kernel(
    hidden_ptr,  # [M, H] rows as integers of the element's width
    row_scales_ptr,  # [M, G] float32 (read only when HAS_SCALES)
    pair_slots_ptr,  # [M*k] int32: slot of each pair, −1 when dropped
    sorted_pairs_ptr,  # [capacity] int32: pair of each slot, num_pairs in padding
    expert_offsets_ptr,  # [E + 1] int32: [E] = slots in use
    grouped_ptr,  # [capacity, H] like hidden, out
    grouped_scales_ptr,  # [capacity, G] float32, out (written only when HAS_SCALES)
    num_tokens,
    num_experts,
    H,
    G,
    stride_hm,
    stride_gm,
    stride_sm,
    stride_gsm,
    TOP_K: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PAD_ROWS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    EVEN_H: tl.constexpr,
):
    """Grid (cdiv(M, ROWS) + capacity / BLOCK_M, H-tiles).

    Programs below cdiv(M, ROWS) scatter ROWS tokens' row tiles to their slots; the
    rest each own one plan block and zero its padding rows (so GEMMs that do not mask
    rows read finite values). Slots past the last expert's run are never written.
    """
    pid = tl.program_id(0)
    token_programs = tl.cdiv(num_tokens, ROWS)
    if pid < token_programs:
        _scatter_rows(hidden_ptr, row_scales_ptr, pair_slots_ptr, grouped_ptr,
                      grouped_scales_ptr, pid, num_tokens, H, G, stride_hm, stride_gm,
                      stride_sm, stride_gsm, TOP_K, ROWS, BLOCK_H, BLOCK_G, HAS_SCALES,
                      EVEN_H)
    else:
        _zero_padding(sorted_pairs_ptr, expert_offsets_ptr, grouped_ptr, grouped_scales_ptr,
                      pid - token_programs, num_tokens * TOP_K, num_experts, H, G,
                      stride_gm, stride_gsm, BLOCK_M, PAD_ROWS, BLOCK_H, BLOCK_G,
                      HAS_SCALES, EVEN_H)


@triton.jit
def _unpermute_kernel(
    grouped_ptr,  # [capacity, H] bf16/fp16/fp32
    topk_weights_ptr,  # [M, k] float32
    pair_slots_ptr,  # [M*k] int32: slot of each pair, −1 when dropped
    out_ptr,  # [M, H] like grouped, out
    num_tokens,
    H,
    stride_gm,
    stride_wm,
    stride_om,
    TOP_K: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EVEN_H: tl.constexpr,
):
    """Grid (cdiv(M, ROWS), H-tiles): ROWS tokens' BLOCK_H output columns, each a
    weighted sum of its k slots.

    A dropped pair reads neither its row nor its weight: garbage there (even NaN) never
    reaches the output.
    """
    tokens = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tok_ok = tokens < num_tokens
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    if EVEN_H:
        mask = tok_ok[:, None]
    else:
        mask = tok_ok[:, None] & (cols < H)[None, :]
    acc = tl.zeros([ROWS, BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        slots = tl.load(pair_slots_ptr + tokens * TOP_K + j, mask=tok_ok, other=-1)
        kept = slots >= 0
        w = tl.load(topk_weights_ptr + tokens.to(tl.int64) * stride_wm + j, mask=kept,
                    other=0.0)
        src = grouped_ptr + tl.maximum(slots, 0).to(tl.int64)[:, None] * stride_gm + cols[None, :]
        rows = tl.load(src, mask=mask & kept[:, None], other=0.0, eviction_policy="evict_first")
        acc += w[:, None] * rows.to(tl.float32)
    dst = out_ptr + tokens.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)
