"""Triton kernels of permute/unpermute over the plan's contiguous grouped layout.

    _permute_kernel     grid (capacity, H-tiles)  grouped[s] = hidden[sorted_pairs[s] // k]
    _unpermute_kernel   grid (M, H-tiles)         out[m] = Σ_j w[m,j] · grouped[pair_slots[m*k+j]]

Both are pure row moves, so they live or die by memory width: a program moves one row
tile of BLOCK_H contiguous columns, each thread 16 bytes at a time (the host picks
BLOCK_H and the warps so a tile is whole 16-byte vectors per thread). Row offsets are
64-bit (capacity·H and M·H can exceed 2^31); offsets inside a row stay 32-bit.

permute copies bits: the host hands it integer views of the rows (int8/int16/int32), so
fp8, bf16, fp16 and fp32 rows share one kernel and nothing is ever rounded. unpermute
reads each pair's slot from the plan's inverse map and sums the k slots of a token in
slot order in fp32 — deterministic, no atomics.
"""

import triton
import triton.language as tl


@triton.jit
def _permute_kernel(
    hidden_ptr,  # [M, H] rows as integers of the element's width
    row_scales_ptr,  # [M, G] float32 (read only when HAS_SCALES)
    sorted_pairs_ptr,  # [capacity] int32: pair of each slot, num_pairs in padding
    expert_offsets_ptr,  # [E + 1] int32: [E] = slots in use
    grouped_ptr,  # [capacity, H] like hidden, out
    grouped_scales_ptr,  # [capacity, G] float32, out (written only when HAS_SCALES)
    num_pairs,
    num_experts,
    H,
    G,
    stride_hm,
    stride_gm,
    stride_sm,
    stride_gsm,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    EVEN_H: tl.constexpr,
):
    """Grid (capacity, H-tiles): one program copies BLOCK_H columns of one slot's row.

    A padding slot gets zeros (so GEMMs that do not mask rows read finite values);
    a slot past the last expert's run belongs to no block and its program exits.
    Program (s, 0) also moves slot s's row scales.
    """
    slot = tl.program_id(0)
    used = tl.load(expert_offsets_ptr + num_experts)
    if slot >= used:
        return
    pair = tl.load(sorted_pairs_ptr + slot)
    real = pair < num_pairs
    token = tl.where(real, pair // TOP_K, 0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    # `real` is one scalar per program: the masked load is all-or-nothing, a padding
    # slot reads no memory and stores zeros (`other`).
    if EVEN_H:
        mask = real
    else:
        mask = (cols < H) & real
    row = tl.load(hidden_ptr + token * stride_hm + cols, mask=mask, other=0)
    dst = grouped_ptr + slot.to(tl.int64) * stride_gm + cols
    if EVEN_H:
        tl.store(dst, row)
    else:
        tl.store(dst, row, mask=cols < H)

    if HAS_SCALES:
        if tl.program_id(1) == 0:
            g = tl.arange(0, BLOCK_G)
            scales = tl.load(row_scales_ptr + token * stride_sm + g, mask=(g < G) & real,
                             other=0.0)
            tl.store(grouped_scales_ptr + slot.to(tl.int64) * stride_gsm + g, scales,
                     mask=g < G)


@triton.jit
def _unpermute_kernel(
    grouped_ptr,  # [capacity, H] bf16/fp16/fp32
    topk_weights_ptr,  # [M, k] float32
    pair_slots_ptr,  # [M*k] int32: slot of each pair, −1 when dropped
    out_ptr,  # [M, H] like grouped, out
    H,
    stride_gm,
    stride_wm,
    stride_om,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EVEN_H: tl.constexpr,
):
    """Grid (M, H-tiles): one token's BLOCK_H output columns, a weighted sum of its k slots.

    The k loads are independent (the loop is unrolled), so they are in flight together.
    A dropped pair reads neither its row nor its weight: garbage there (even NaN) never
    reaches the output.
    """
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        slot = tl.load(pair_slots_ptr + token * TOP_K + j)
        valid = slot >= 0
        w = tl.load(topk_weights_ptr + token * stride_wm + j, mask=valid, other=0.0)
        src = grouped_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_gm + cols
        if EVEN_H:
            row = tl.load(src, mask=valid, other=0.0)
        else:
            row = tl.load(src, mask=col_ok & valid, other=0.0)
        acc += w * row.to(tl.float32)
    dst = out_ptr + token * stride_om + cols
    if EVEN_H:
        tl.store(dst, acc.to(out_ptr.dtype.element_ty))
    else:
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=col_ok)
