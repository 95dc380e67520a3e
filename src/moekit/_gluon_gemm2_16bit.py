"""16-bit (bf16/fp16) GEMM2 of the plan path at 128-row tiles as a warp-specialised Gluon
kernel (sm_90).

GEMM2's K is the intermediate size: few K steps per tile (qwen3's 768: 12), so a tile's
prologue and epilogue weigh on it more than on GEMM1, and Triton's GEMM2 ran at ~56% of
the bf16 peak (qwen3 M = 4096, 232 µs). Split as the 16-bit Gluon GEMM1
(`moekit._gluon_gemm1_16bit`), whose tile is the same shape:

    producer warpgroup    the fp8 GEMM2's (`moekit._gluon_gemm2._producer`): TMA loads of
                          each K step's A (`inter`, 128 plan rows × 64) and B (w2 rows: two
                          128-column halves × 64), 48 KB a stage, into a ring of STAGES;
                          it runs ahead into the next tile while the math does an epilogue
    two math warpgroups   64 rows × both halves each (a tail tile's 64 rows: one half
                          each); products accumulate in the MMA itself, one K step's two
                          MMAs left in flight (`paired_mainloop`); epilogue: the bias, the
                          router weight (which scales the bias too), TMA stores in plan
                          order

Output rows stay in plan order ([capacity, H]; TMA cannot scatter): the combine reads each
pair's row through `DispatchPlan.pair_slots`.
"""

from __future__ import annotations

import torch

from moekit import _gluon
from moekit._gluon import BLOCK_M, HALF_M, HAVE_GLUON, descriptor, gluon_allowed, work_list
from moekit._launch import launcher

if HAVE_GLUON:
    from moekit._gluon import (
        entry_tile,
        fence_async_shared,
        first_entries,
        gl,
        gluon,
        ordered_tile_coords,
        paired_mainloop,
        prefetch_entry,
        program_tiles,
        row_tile,
        stage_ring,
        tiles_in_use,
        tma,
    )
    from moekit._gluon_gemm2 import _producer

# A tile: 128 rows × two 128-column halves, 64 two-byte K steps; 4 stages of 48 KB.
BLOCK_N, BLOCK_K, STAGES = 128, 64, 4
TILE_N = 2 * BLOCK_N
_DTYPES = (torch.bfloat16, torch.float16)


# Where one expert's w2 outgrows half of L2 and the experts average at most this many row
# tiles, Triton's GEMM2 runs instead. There this kernel reads w2 ~1.3× from DRAM and
# Triton's ~once, in any tile order (Nsight Compute, H100, deepseek-v3 M = 4096: 10.6–11.2 GB
# at GROUP_M 1 / 2 / 8 against 8.5; w2 is 7.5 GB; the 64-row tail box changed nothing).
# H100, three rounds: deepseek-v3's layer 1.089× at M = 4096 (128 rows an expert) and
# 1.028× at 8192 (256); at 16384 (512) this kernel wins, 1.024×; qwen3 and olmoe, whose w2
# fits, lose 2–7% with Triton's at every M (bench/NOTES.md, session 47).
FEW_ROW_TILES = 2


def few_row_tiles_of_large_experts(w2: torch.Tensor, num_pairs: int) -> bool:
    """Whether experts whose w2 outgrows half of L2 average at most FEW_ROW_TILES row tiles
    over `num_pairs` (token, expert) pairs: where Triton's GEMM2 streams w2 better."""
    return (num_pairs <= FEW_ROW_TILES * BLOCK_M * w2.shape[0]
            and _gluon.w2_outgrows_half_l2(w2))


def use_gluon_gemm2_16bit(w2: torch.Tensor, block_m: int, num_pairs: int) -> bool:
    """Whether the 16-bit GEMM2 over `num_pairs` (token, expert) pairs runs as
    `_gemm2_ws16_kernel`: Gluon allowed (an sm_90 GPU), bf16/fp16, 128-row tiles, whole
    256-column tiles (H a multiple of 256), 16-byte rows (I a multiple of 8) and base for
    TMA, contiguous; and not few row tiles of large experts (`few_row_tiles_of_large_experts`,
    unless `MOEKIT_GLUON_GEMM2=1`). Its input is GEMM1's `inter`, fresh, contiguous and in
    w2's dtype (the layer's checks: one dtype throughout)."""
    if not gluon_allowed(w2) or not _gluon.gemm2_allowed():
        return False
    _, hidden_size, inter_size = w2.shape
    return (
        w2.dtype in _DTYPES
        and block_m == BLOCK_M
        and hidden_size % TILE_N == 0
        and inter_size % 8 == 0
        and w2.is_contiguous()
        and w2.data_ptr() % 16 == 0
        and (_gluon.gemm2_forced() or not few_row_tiles_of_large_experts(w2, num_pairs))
    )


if HAVE_GLUON:
    _TILE_M = gl.constexpr(BLOCK_M)  # globals a kernel reads must be constexpr objects
    _HALF_M = gl.constexpr(HALF_M)

    @gluon.jit
    def _row_weights(first_row, topk_weights_ptr, sorted_pairs_ptr, num_pairs,
                     layout: gl.constexpr):
        """The router weights of plan slots [first_row, +64) (all the tile's; padding slots
        hold ≥ num_pairs and weigh 0), loaded before the K loop so that the two dependent
        gathers land under it rather than in the epilogue."""
        return _pair_weights(_row_pairs(first_row, sorted_pairs_ptr, layout), topk_weights_ptr,
                             num_pairs)

    @gluon.jit
    def _row_pairs(first_row, sorted_pairs_ptr, layout: gl.constexpr):
        """The pairs of plan slots [first_row, +64): `_row_weights`' first load."""
        return gl.load(sorted_pairs_ptr + first_row
                       + gl.arange(0, _HALF_M, layout=gl.SliceLayout(1, layout)))

    @gluon.jit
    def _pair_weights(pair, topk_weights_ptr, num_pairs):
        """The router weights of `_row_pairs`' pairs (padding slots' weigh 0)."""
        return gl.load(topk_weights_ptr + pair, mask=pair < num_pairs, other=0.0)

    @gluon.jit
    def _warpgroup_row(first_slot, rows, CONSUMER: gl.constexpr):
        """A math warpgroup's first row of a tile: a whole tile's half, a tail's all."""
        return first_slot + gl.where(rows == _TILE_M, CONSUMER * _HALF_M, 0)

    @gluon.jit
    def _store_half(acc, desc, smem, first_row, first_col, expert, b2_ptr, weights, stride_be,
                    HAS_BIAS: gl.constexpr, APPLY_WEIGHT: gl.constexpr):
        """One accumulator's epilogue (64 rows × its width from `first_col`): the bias, the
        router weights (on the output: they scale the bias too), stored in `desc`'s dtype
        by TMA from `smem` once the previous store has left it."""
        WIDTH: gl.constexpr = acc.shape[1]
        if HAS_BIAS:
            cols = first_col + gl.arange(0, WIDTH, layout=gl.SliceLayout(0, acc.type.layout))
            bias = gl.load(b2_ptr + expert.to(gl.int64) * stride_be + cols)
            acc = acc + bias.to(gl.float32)[None, :]
        if APPLY_WEIGHT:
            acc = acc * gl.convert_layout(weights, gl.SliceLayout(1, acc.type.layout))[:, None]
        tma.store_wait(pendings=0)
        smem.store(acc.to(desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(desc, [first_row, first_col], smem)

    @gluon.jit
    def _consumer(c_desc, q_desc, b2_ptr, topk_weights_ptr, sorted_pairs_ptr, num_pairs,
                  block_experts_ptr, work_ptr, offsets_ptr, num_work, H, I, stride_be, a_bufs,
                  b_bufs, ready, empty, c_bufs, CONSUMER: gl.constexpr, TAIL_M: gl.constexpr,
                  GROUP_M: gl.constexpr, NUM_BUFFERS: gl.constexpr, HAS_BIAS: gl.constexpr,
                  APPLY_WEIGHT: gl.constexpr, PREFETCH: gl.constexpr,
                  EXPERT_GROUPS: gl.constexpr, CHUNK: gl.constexpr):
        """Math warpgroup CONSUMER of every tile: rows [CONSUMER·64, +64) × both column
        halves, or, in a tail tile (64 rows), its rows × half
        CONSUMER (as two 64-column products, `q_desc`'s [64, 64] boxes), so that a tail
        takes both warpgroups."""
        BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
        TILE_N: gl.constexpr = b_bufs.shape[1]
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        rows_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)
        c_smem = c_bufs.index(CONSUMER)
        n_tiles = H // TILE_N
        used = tiles_in_use(work_ptr, num_work, TAIL_M)
        total = used * n_tiles
        first, end, step = program_tiles(total, CHUNK)
        if PREFETCH:  # as the producer: the next tile's expert, rows and pairs, loaded
            # during this tile's K loop (its work entry during the one before)
            first_slot, expert, rows, entry = first_entries(
                first, step, total, used, n_tiles, work_ptr, block_experts_ptr, GROUP_M,
                TAIL_M, offsets_ptr, EXPERT_GROUPS)
            if APPLY_WEIGHT:
                pair = _row_pairs(_warpgroup_row(first_slot, rows, CONSUMER),
                                  sorted_pairs_ptr, acc_layout)
        counter = 0
        for tile in range(first, end, step):
            pid_m, pid_n = ordered_tile_coords(  # as `_producer`'s
                tile, used, n_tiles, work_ptr, block_experts_ptr, offsets_ptr, True, GROUP_M,
                EXPERT_GROUPS, TAIL_M)
            col0 = pid_n * TILE_N
            weights = gl.zeros([_HALF_M], gl.float32, layout=rows_layout)
            if PREFETCH:
                tile_slot = first_slot
                tile_expert = expert
                tile_rows = rows
                if APPLY_WEIGHT:  # waited on in the epilogue, not here
                    weights = _pair_weights(pair, topk_weights_ptr, num_pairs)
                first_slot, expert, rows = entry_tile(entry, block_experts_ptr, TAIL_M)
                if APPLY_WEIGHT:
                    pair = _row_pairs(_warpgroup_row(first_slot, rows, CONSUMER),
                                      sorted_pairs_ptr, acc_layout)
                entry = prefetch_entry(tile + 2 * step, total, used, n_tiles, work_ptr, GROUP_M,
                                       TAIL_M, block_experts_ptr, offsets_ptr, EXPERT_GROUPS)
            else:
                tile_slot, tile_expert, tile_rows = row_tile(work_ptr, block_experts_ptr,
                                                             pid_m, TAIL_M)
                if APPLY_WEIGHT:
                    weights = _row_weights(_warpgroup_row(tile_slot, tile_rows, CONSUMER),
                                           topk_weights_ptr, sorted_pairs_ptr, num_pairs,
                                           acc_layout)
            # Without tail tiles the tail branch is not compiled (dead code there crashed
            # Triton 3.6's lowering, as in the 16-bit GEMM1).
            whole = True
            if TAIL_M:
                whole = tile_rows == _TILE_M
            # A tail's 64 rows are all this warpgroup's; a whole tile's, its half.
            row = _warpgroup_row(tile_slot, tile_rows, CONSUMER)
            if whole:
                lo, hi, counter = paired_mainloop(
                    a_bufs, b_bufs, b_bufs, ready, empty, counter, I, CONSUMER * _HALF_M,
                    0, BLOCK_N, BLOCK_N, NUM_BUFFERS, False)
                _store_half(lo, c_desc, c_smem, row, col0, tile_expert, b2_ptr, weights, stride_be,
                            HAS_BIAS, APPLY_WEIGHT)
                _store_half(hi, c_desc, c_smem, row, col0 + BLOCK_N, tile_expert, b2_ptr, weights,
                            stride_be, HAS_BIAS, APPLY_WEIGHT)
            elif TAIL_M:
                # A [64, 64] box in the same bytes; names of their own (a branch's values
                # may not change type).
                q_smem = c_smem._reinterpret(q_desc.dtype, q_desc.block_type.shape,
                                             q_desc.layout)
                # (The slices' starts written out: a constexpr named inside a branch
                # becomes a tensor.)
                left, right, counter = paired_mainloop(
                    a_bufs, b_bufs, b_bufs, ready, empty, counter, I, 0, CONSUMER * BLOCK_N,
                    CONSUMER * BLOCK_N + _HALF_M, _HALF_M, NUM_BUFFERS, False)
                col = col0 + CONSUMER * BLOCK_N
                _store_half(left, q_desc, q_smem, row, col, tile_expert, b2_ptr, weights,
                            stride_be, HAS_BIAS, APPLY_WEIGHT)
                _store_half(right, q_desc, q_smem, row, col + _HALF_M, tile_expert, b2_ptr,
                            weights, stride_be, HAS_BIAS, APPLY_WEIGHT)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _gemm2_ws16_kernel(
        a_desc,  # inter [capacity, I] in plan order, [128, BLOCK_K] boxes
        b_desc,  # w2 as [E·H, I], [TILE_N, BLOCK_K] boxes
        c_desc,  # out [capacity, H] in plan order, [64, BLOCK_N] boxes
        q_desc,  # the same, [64, 64] boxes (a tail tile's stores)
        b2_ptr,  # [E, H] (read only when HAS_BIAS)
        topk_weights_ptr,  # [M·k] fp32 (read only when APPLY_WEIGHT)
        sorted_pairs_ptr,  # [capacity] int32: slot → pair
        block_experts_ptr,  # [capacity / plan rows] int32
        work_ptr,  # TAIL_M: the work list, its length after it; else expert_offsets [E + 1]
        offsets_ptr,  # expert_offsets [E + 1] (read only when EXPERT_GROUPS)
        num_work,  # TAIL_M: the work list's length in entries; else E
        num_pairs, H, I, stride_be,
        TAIL_M: gl.constexpr, GROUP_M: gl.constexpr, NUM_BUFFERS: gl.constexpr,
        HAS_BIAS: gl.constexpr, APPLY_WEIGHT: gl.constexpr, PREFETCH: gl.constexpr,
        EXPERT_GROUPS: gl.constexpr, CHUNK: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Persistent over (row tile, 256 hidden columns) in `ordered_tile_coords` order
        (GROUP_M row tiles per column tile, with EXPERT_GROUPS never two experts' in a
        group; 1: row tile major); this program's own warpgroup is the producer, two more
        the math."""
        gl.static_assert(num_warps == 4, "the producer is one warpgroup")
        dtype: gl.constexpr = a_desc.dtype
        gl.static_assert(dtype.primitive_bitwidth == 16, "16-bit operands")
        a_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS] + a_desc.block_type.shape,
                                           a_desc.layout)
        b_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS] + b_desc.block_type.shape,
                                           b_desc.layout)
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2] + c_desc.block_type.shape,
                                           c_desc.layout)
        ready, empty = stage_ring(NUM_BUFFERS, 1)
        gl.warp_specialize(
            [(_producer, (a_desc, b_desc, block_experts_ptr, work_ptr, offsets_ptr,
                          num_work, H, I, a_bufs, b_bufs, ready, empty, TAIL_M, GROUP_M,
                          NUM_BUFFERS, PREFETCH, EXPERT_GROUPS, CHUNK)),
             (_consumer, (c_desc, q_desc, b2_ptr, topk_weights_ptr, sorted_pairs_ptr,
                          num_pairs, block_experts_ptr, work_ptr, offsets_ptr, num_work, H, I,
                          stride_be, a_bufs, b_bufs, ready, empty, c_bufs, 0, TAIL_M, GROUP_M,
                          NUM_BUFFERS, HAS_BIAS, APPLY_WEIGHT, PREFETCH, EXPERT_GROUPS,
                          CHUNK)),
             (_consumer, (c_desc, q_desc, b2_ptr, topk_weights_ptr, sorted_pairs_ptr,
                          num_pairs, block_experts_ptr, work_ptr, offsets_ptr, num_work, H, I,
                          stride_be, a_bufs, b_bufs, ready, empty, c_bufs, 1, TAIL_M, GROUP_M,
                          NUM_BUFFERS, HAS_BIAS, APPLY_WEIGHT, PREFETCH, EXPERT_GROUPS,
                          CHUNK))],
            [4, 4], [232, 232])


def gluon_gemm2_16bit(inter: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None,
                      topk_weights: torch.Tensor | None, plan, programs: int) -> torch.Tensor:
    """16-bit GEMM2 over the plan's row tiles into plan-order rows (`_gemm2_ws16_kernel`).

    Args:
        inter: [capacity, I] bf16/fp16 in plan order (GEMM1's output), contiguous.
        w2: [E, H, I], same dtype, contiguous; b2: optional [E, H].
        topk_weights: [M·k] fp32 to multiply each row (bias included) by its pair's router
            weight, or None (the weight was applied on the input).
        plan: the `DispatchPlan` (128-row blocks, or 64 with the tail work list).
        programs: the persistent grid (one per SM; `_gluon.schedule` may launch one program
            per tile instead).
    Returns:
        [capacity, H] in inter's dtype; rows of padding slots hold unspecified values.
    """
    _, hidden_size, inter_size = w2.shape
    out = torch.empty((plan.capacity, hidden_size), dtype=inter.dtype, device=inter.device)
    work, num_work, tail_m = work_list(plan)
    dummy = plan.sorted_pairs  # stands in for absent tensors; never read
    grid, chunk = _gluon.schedule(programs, plan, hidden_size // TILE_N, gemm=2)
    launcher(_gemm2_ws16_kernel)[grid](
        descriptor(inter, [BLOCK_M, BLOCK_K]), descriptor(w2, [TILE_N, BLOCK_K]),
        descriptor(out, [HALF_M, BLOCK_N]), descriptor(out, [HALF_M, HALF_M]),
        dummy if b2 is None else b2, dummy if topk_weights is None else topk_weights,
        plan.sorted_pairs, plan.block_experts, work, plan.expert_offsets, num_work,
        plan.num_pairs, hidden_size, inter_size, 0 if b2 is None else b2.stride(0),
        TAIL_M=tail_m, GROUP_M=_gluon.gemm2_group_m(w2), NUM_BUFFERS=STAGES,
        HAS_BIAS=b2 is not None,
        APPLY_WEIGHT=topk_weights is not None, PREFETCH=_gluon.PREFETCH_TILES,
        EXPERT_GROUPS=_gluon.EXPERT_GROUPS, CHUNK=chunk, num_warps=4,
    )
    return out
