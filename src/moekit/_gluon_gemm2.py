"""fp8 GEMM2 of the plan path at 128-row tiles as a warp-specialised Gluon kernel (sm_90).

Triton 3.6 does not split a loop into producer and consumer warps on Hopper, and its
fp8 GEMM2 (K = I: few K steps, every step promoted into fp32) ran at ~36% of the fp8
peak. Gluon (`triton.experimental.gluon`) writes the schedule by hand:

    producer warpgroup    TMA loads of each K step's A (`inter`, 128 plan rows) and B
                          (w2 rows: one or two 128-column halves) into a ring of stages
    two math warpgroups   each multiplies one 64-row half of every stage by each half of
                          B (promoted: a fresh product per stage, scaled and added in
                          fp32 — one [64, 128] accumulator per half), releases the stage,
                          and runs its own epilogue per half: scales, bias, router
                          weight, a TMA store of its 64 rows

A tile is 256 columns (two halves sharing each A stage, GEMM1's shape: 4 stages of 48 KB)
where H allows and the weight scales are constant along K or one per half (block scales
without biases, `column_halves`), else 128 (5 stages of 32 KB).

Output rows stay in plan order ([capacity, H]): TMA stores whole boxes, and Hopper's TMA
cannot scatter; the combine reads each pair's row through `DispatchPlan.pair_slots`.
The persistent tile loop walks the plan's work list as the Triton GEMM2 does; a tail
tile (its run's odd last 64 rows) is split by columns across the two warpgroups (one
128-column half each, or 64 columns of a 128-column tile), not left to one of them: a
tie with the idle-warpgroup version on the H200 (0.99–1.02×, bench/NOTES.md session 21).

Measured (H200, bench/NOTES.md session 12): fp8 GEMM2 1.29–1.32× faster than the Triton
kernel (qwen3 M = 4096: 165 against 217 µs per-tensor, 173 against 224 block; mixtral 936
against 1,233), the fp8 layer 1.05–1.17× at M = 4096. The same kernel unpromoted for
bf16 weights made the 16-bit layer 0.90–1.02× (bench/results/
h200-20261202-kernels-bf16-prefill-gluon{0,1}.md): 16-bit GEMM2 stays Triton's.
Two halves per tile (bench/results/h200-20261202-gluon-wide-gemm2-experiment.md): GEMM2
1.05–1.31× faster again (qwen3 M = 4096 136 against 156 µs; mixtral 952 against 1,251),
bitwise the same output. The consumer's structure keeps it free of spills: the product in
flight is a per-tile value (dead in the epilogue), column indices are built where they
are used.
"""

from __future__ import annotations

import os

import torch

from moekit import _gluon
from moekit._gluon import (
    BLOCK_M,
    HALF_M,
    HAVE_GLUON,
    descriptor,
    gluon_allowed,
    work_list,
)
from moekit._intmath import cdiv
from moekit._launch import launcher

if HAVE_GLUON:
    from moekit._gluon import (
        entry_tile,
        fence_async_shared,
        first_entries,
        gl,
        gluon,
        mbarrier,
        ordered_tile_coords,
        prefetch_entry,
        program_tiles,
        release_steps,
        row_tile,
        stage_ring,
        tiles_in_use,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

# 128 × 128 × 128 one-byte K steps in 5 stages of 32 KB: the promoted shape measured
# (bench/results/h200-20261202-gluon-grouped-gemm-experiment.md).
BLOCK_N, BLOCK_K, STAGES = 128, 128, 5
WIDE_STAGES = 4  # of 48 KB: A [128, 128] and B [256, 128], for tiles of two halves


def use_gluon_gemm2(w2: torch.Tensor, block_m: int, k_groups: list[int]) -> bool:
    """Whether GEMM2 runs as `_gemm2_ws_kernel`: Gluon allowed (`gluon_allowed`: an sm_90
    GPU), fp8 weights, 128-row tiles, 16-byte rows and base (H's too: the last column
    tile may be partial, as gpt-oss's H = 2880), and each K group of GEMM2's scales
    (`k_groups`: its input's and weight's, if any) holding whole K steps."""
    if not gluon_allowed(w2) or not _gluon.gemm2_allowed():
        return False
    _, hidden, inter = w2.shape
    return (
        w2.dtype == torch.float8_e4m3fn
        and block_m == BLOCK_M
        and hidden % 16 == 0
        and inter % 16 == 0
        and all(group % BLOCK_K == 0 for group in k_groups)
        and w2.is_contiguous()
        and w2.data_ptr() % 16 == 0  # TMA's base alignment
    )


# Block scales on two-half tiles (`column_halves`): on an H100 the layer 1.014–1.079×
# (median 1.038) at qwen3, mixtral and deepseek-v3 M = 4096–8192, two rounds
# (bench/results/h100-sxm-20261207-ab-fp8_block-wide-gemm2-s62.md), so on;
# `MOEKIT_GLUON_WIDE_BLOCK_GEMM2=0` (read at import) turns it off.
WIDE_PER_K_WEIGHTS = os.environ.get("MOEKIT_GLUON_WIDE_BLOCK_GEMM2") != "0"


def column_halves(hidden: int, weight_per_k: bool, weight_uniform_n: bool, has_bias: bool,
                  out_dtype: torch.dtype) -> int:
    """128-column halves per tile: two where H is a multiple of 256 and the output 16-bit
    (four 48 KB stages and two float32 [64, 128] output boxes need 256 KB of shared memory;
    sm_90 has 227); with per-K weight scales, only as one scalar per half
    (`weight_uniform_n`: block scales), without biases and unless switched off
    (`WIDE_PER_K_WEIGHTS`). There the router weights are loaded after the K loop and a
    tail is the first warpgroup's alone (`_consumer`): so sm_90 compiles spill nothing in
    the K loops (12–24 bytes a tile outside them); held across the loop, or with a second
    loop for tails, or with biases, they spilled into it (bench/NOTES.md, sessions 41 and
    61)."""
    if weight_per_k and not (weight_uniform_n and not has_bias and WIDE_PER_K_WEIGHTS):
        return 1
    return 2 if hidden % (2 * BLOCK_N) == 0 and out_dtype.itemsize <= 2 else 1


if HAVE_GLUON:
    _TILE_M = gl.constexpr(BLOCK_M)  # globals a kernel reads must be constexpr objects
    _HALF_M = gl.constexpr(HALF_M)

    @gluon.jit
    def _producer(a_desc, b_desc, block_experts_ptr, work_ptr, offsets_ptr, num_work,
                  H, I, a_bufs, b_bufs, ready, empty, TAIL_M: gl.constexpr,
                  GROUP_M: gl.constexpr, NUM_BUFFERS: gl.constexpr, PREFETCH: gl.constexpr,
                  EXPERT_GROUPS: gl.constexpr, CHUNK: gl.constexpr):
        """TMA loads of every K step of every tile into the ring, each stage reloaded once
        both math warpgroups have released it. PREFETCH: a tile's expert is loaded during
        the tile before's K loop, its work entry during the one before that (as the
        GEMM1 producer's), so a tile's first loads wait on neither. A tail tile's A is
        the whole 128-row box, its second half the next tile's rows, never read. Tiles in
        `ordered_tile_coords` order (EXPERT_GROUPS: `expert_tile_coords`)."""
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        n_tiles = gl.cdiv(H, BLOCK_N)
        used = tiles_in_use(work_ptr, num_work, TAIL_M)
        total = used * n_tiles
        first, end, step = program_tiles(total, CHUNK)
        if PREFETCH:
            first_slot, expert, rows, entry = first_entries(
                first, step, total, used, n_tiles, work_ptr, block_experts_ptr, GROUP_M,
                TAIL_M, offsets_ptr, EXPERT_GROUPS)
        counter = 0
        for tile in range(first, end, step):
            pid_m, pid_n = ordered_tile_coords(tile, used, n_tiles, work_ptr, block_experts_ptr,
                                               offsets_ptr, True, GROUP_M, EXPERT_GROUPS,
                                               TAIL_M)
            if PREFETCH:
                tile_slot = first_slot
                tile_expert = expert
                first_slot, expert, rows = entry_tile(entry, block_experts_ptr, TAIL_M)
                entry = prefetch_entry(tile + 2 * step, total, used, n_tiles, work_ptr, GROUP_M,
                                       TAIL_M, block_experts_ptr, offsets_ptr, EXPERT_GROUPS)
            else:
                tile_slot, tile_expert, _ = row_tile(work_ptr, block_experts_ptr, pid_m, TAIL_M)
            # A partial last column tile reads on into the next expert's rows (or TMA's
            # zeros): columns the stores clip.
            b_row = tile_expert * H + pid_n * BLOCK_N
            for k in range(0, I, BLOCK_K):
                index = counter % NUM_BUFFERS
                # A fresh barrier is in phase 0: waiting for parity 1 passes at once.
                mbarrier.wait(empty.index(index), ((counter // NUM_BUFFERS) & 1) ^ 1)
                bar = ready.index(index)
                mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [tile_slot, k], bar, a_bufs.index(index))
                tma.async_copy_global_to_shared(b_desc, [b_row, k], bar, b_bufs.index(index))
                counter += 1

    @gluon.jit
    def _scaled_part(part, step_scale, ws_base, k, col, H, stride_wsk, stride_wsn,
                     W_PER_K: gl.constexpr, W_GROUP_N: gl.constexpr, W_GROUP_K: gl.constexpr,
                     W_UNIFORM_N: gl.constexpr, PARTIAL_N: gl.constexpr):
        """One stage's promoted product × its K-group scales: the rows' (`step_scale`,
        with a column-uniform weight scale folded in) and a per-column weight scale (of
        the 128 columns from `col`; their indices built only here, so that they hold no
        registers across the loop)."""
        part = part * step_scale[:, None]
        if W_PER_K and not W_UNIFORM_N:
            cols = col + gl.arange(0, part.shape[1], layout=gl.SliceLayout(0, part.type.layout))
            part = part * gl.load(ws_base + (k // W_GROUP_K) * stride_wsk
                                  + (cols // W_GROUP_N) * stride_wsn,
                                  mask=cols < H if PARTIAL_N else None)[None, :]
        return part

    @gluon.jit
    def _store_columns(acc, c_desc, c_smem, row, col, H, a_rows, weights, ws_base, bias_base,
                       stride_wsn, A_PER_K: gl.constexpr, W_PER_K: gl.constexpr,
                       W_GROUP_N: gl.constexpr, W_UNIFORM_N: gl.constexpr,
                       HAS_BIAS: gl.constexpr, APPLY_WEIGHT: gl.constexpr,
                       PARTIAL_N: gl.constexpr):
        """The epilogue of one [64, 128] accumulator (columns from `col`): scales constant
        along K, the bias, the router weight (which scales the bias too), a TMA store of
        its rows (which clips columns from H on; PARTIAL_N: per-column loads stop there,
        where the last expert's tensors end)."""
        cols = col + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, acc.type.layout))
        in_h = cols < H if PARTIAL_N else None
        if not A_PER_K:
            acc = acc * a_rows[:, None]
        if not W_PER_K:
            if W_UNIFORM_N:
                acc = acc * gl.load(ws_base + (col // W_GROUP_N) * stride_wsn)
            else:
                acc = acc * gl.load(ws_base + (cols // W_GROUP_N) * stride_wsn,
                                    mask=in_h)[None, :]
        if HAS_BIAS:
            acc = acc + gl.load(bias_base + cols, mask=in_h).to(gl.float32)[None, :]
        if APPLY_WEIGHT:
            acc = acc * weights[:, None]
        tma.store_wait(pendings=0)  # the previous store has left c_smem
        c_smem.store(acc.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [row, col], c_smem)

    @gluon.jit
    def _router_weights(slots, sorted_pairs_ptr, topk_weights_ptr, num_pairs):
        """The router weight of each slot's pair (0 for padding slots, which hold pair
        indices ≥ num_pairs)."""
        pairs = gl.load(sorted_pairs_ptr + slots)
        row_ok = pairs < num_pairs
        return gl.load(topk_weights_ptr + gl.where(row_ok, pairs, 0), mask=row_ok, other=0.0)

    @gluon.jit
    def _piece(row, col, expert, as_ptr, ws_ptr, b2_ptr, topk_weights_ptr, sorted_pairs_ptr,
               num_pairs, H, I, stride_asm, stride_ask, stride_wse, stride_wsn, stride_wsk,
               stride_be, a_bufs, b_bufs, ready, empty, counter, c_desc, c_smem,
               A_START: gl.constexpr, B_START: gl.constexpr, WIDTH: gl.constexpr,
               PARTS: gl.constexpr, BLOCK_K: gl.constexpr, NUM_BUFFERS: gl.constexpr,
               A_PER_K: gl.constexpr, A_GROUP_K: gl.constexpr, W_PER_K: gl.constexpr,
               W_GROUP_N: gl.constexpr, W_GROUP_K: gl.constexpr, W_UNIFORM_N: gl.constexpr,
               HAS_BIAS: gl.constexpr, APPLY_WEIGHT: gl.constexpr, PARTIAL_N: gl.constexpr):
        """One math warpgroup's share of a tile: plan rows [row, +64) (A rows [A_START,
        +64) of each stage) × PARTS column parts of WIDTH from `col` (B rows from B_START).
        Each stage's product goes into a fresh accumulator, is scaled by the step's K-group
        scales (A_PER_K, W_PER_K; loaded one step ahead) and added in fp32 — Hopper's fp8
        MMA accumulates at reduced precision. Scales constant along K, the bias and the
        router weight are applied once, in the epilogue, as `_gemm2_fp8_tile` does; the
        per-row factors are loaded before the K loop. Returns the K-step counter."""
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, WIDTH, 32])
        rows_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        ones = gl.full([_HALF_M], 1.0, gl.float32, layout=rows_layout)
        # Every one of the rows is the tile's (padding slots hold ≥ num_pairs).
        slots = (row + gl.arange(0, _HALF_M, layout=rows_layout)).to(gl.int64)
        ws_base = ws_ptr + expert.to(gl.int64) * stride_wse
        # The rows' factors, loaded now so that their latency hides under the loop; the
        # input scale multiplies the products only, the router weight the bias too.
        a_rows = ones
        if not A_PER_K:  # a static input scale (stride 0) or one group per row
            a_rows = gl.load(as_ptr + slots * stride_asm)
        # With per-K weight scales over two halves the router weights are loaded after the
        # loop: held across it, their registers spilled 96 bytes into it (session 41).
        LATE_WEIGHTS: gl.constexpr = W_PER_K and PARTS == 2
        weights = ones
        if APPLY_WEIGHT and not LATE_WEIGHTS:
            weights = _router_weights(slots, sorted_pairs_ptr, topk_weights_ptr, num_pairs)
        # Per-K scales are loaded one K step ahead, so a load has a whole step to land.
        a_step = as_ptr + slots * stride_asm  # [_HALF_M]: K group 0's input scales
        w_step0 = ws_base + (col // W_GROUP_N) * stride_wsn  # W_UNIFORM_N
        w_step1 = ws_base + ((col + WIDTH) // W_GROUP_N) * stride_wsn
        if A_PER_K:
            a_next = gl.load(a_step)
        if W_PER_K and W_UNIFORM_N:
            w_next0 = gl.load(w_step0)
            if PARTS == 2:
                w_next1 = gl.load(w_step1)
        acc0 = gl.zeros((_HALF_M, WIDTH), dtype=gl.float32, layout=mma_layout)
        if PARTS == 2:
            acc1 = gl.zeros((_HALF_M, WIDTH), dtype=gl.float32, layout=mma_layout)
        # Each stage's product; per tile, so that it is dead in the epilogue.
        part = gl.zeros((_HALF_M, WIDTH), dtype=gl.float32, layout=mma_layout)
        for k in range(0, I, BLOCK_K):
            index = counter % NUM_BUFFERS
            mbarrier.wait(ready.index(index), (counter // NUM_BUFFERS) & 1)
            a = a_bufs.index(index).slice(A_START, _HALF_M, dim=0)
            b = b_bufs.index(index)
            part = warpgroup_mma(a, b.slice(B_START, WIDTH, dim=0).permute((1, 0)), part,
                                 use_acc=False, is_async=True)
            row_scale = ones
            k_next = gl.minimum(k + BLOCK_K, I - 1)  # the last step reloads its own
            if A_PER_K:
                row_scale = a_next
                a_next = gl.load(a_step + (k_next // A_GROUP_K) * stride_ask)
            step_scale = row_scale
            if W_PER_K and W_UNIFORM_N:
                step_scale = row_scale * w_next0
                w_next0 = gl.load(w_step0 + (k_next // W_GROUP_K) * stride_wsk)
            part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
            acc0 = acc0 + _scaled_part(part, step_scale, ws_base, k, col, H, stride_wsk,
                                       stride_wsn, W_PER_K, W_GROUP_N, W_GROUP_K, W_UNIFORM_N,
                                       PARTIAL_N)
            if PARTS == 2:
                part = warpgroup_mma(a, b.slice(B_START + WIDTH, WIDTH, dim=0).permute((1, 0)),
                                     part, use_acc=False, is_async=True)
                step_scale = row_scale
                if W_PER_K and W_UNIFORM_N:
                    step_scale = row_scale * w_next1
                    w_next1 = gl.load(w_step1 + (k_next // W_GROUP_K) * stride_wsk)
                part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
                acc1 = acc1 + _scaled_part(part, step_scale, ws_base, k, col + WIDTH, H,
                                           stride_wsk, stride_wsn, W_PER_K, W_GROUP_N,
                                           W_GROUP_K, W_UNIFORM_N, PARTIAL_N)
            mbarrier.arrive(empty.index(index), count=1)
            counter += 1
        if APPLY_WEIGHT and LATE_WEIGHTS:
            weights = _router_weights(slots, sorted_pairs_ptr, topk_weights_ptr, num_pairs)
        bias_base = b2_ptr + expert.to(gl.int64) * stride_be
        _store_columns(acc0, c_desc, c_smem, row, col, H, a_rows, weights, ws_base, bias_base,
                       stride_wsn, A_PER_K, W_PER_K, W_GROUP_N, W_UNIFORM_N, HAS_BIAS,
                       APPLY_WEIGHT, PARTIAL_N)
        if PARTS == 2:
            _store_columns(acc1, c_desc, c_smem, row, col + WIDTH, H, a_rows, weights, ws_base,
                           bias_base, stride_wsn, A_PER_K, W_PER_K, W_GROUP_N, W_UNIFORM_N,
                           HAS_BIAS, APPLY_WEIGHT, PARTIAL_N)
        return counter

    @gluon.jit
    def _consumer(c_desc, h_desc, as_ptr, ws_ptr, b2_ptr, topk_weights_ptr, sorted_pairs_ptr,
                  block_experts_ptr, work_ptr, offsets_ptr, num_work, num_pairs, H, I, stride_asm,
                  stride_ask, stride_wse, stride_wsn, stride_wsk, stride_be, a_bufs, b_bufs,
                  ready, empty, c_bufs,
                  CONSUMER: gl.constexpr, TAIL_M: gl.constexpr, GROUP_M: gl.constexpr,
                  BLOCK_K: gl.constexpr,
                  NUM_BUFFERS: gl.constexpr, A_PER_K: gl.constexpr, A_GROUP_K: gl.constexpr,
                  W_PER_K: gl.constexpr, W_GROUP_N: gl.constexpr, W_GROUP_K: gl.constexpr,
                  W_UNIFORM_N: gl.constexpr, HAS_BIAS: gl.constexpr,
                  APPLY_WEIGHT: gl.constexpr, PARTIAL_N: gl.constexpr,
                  EXPERT_GROUPS: gl.constexpr, CHUNK: gl.constexpr):
        """Math warpgroup CONSUMER of every tile (`_piece`): rows [CONSUMER·64, +64) in one
        or two 128-column halves (a tile as wide as the B box), or, in a tail tile (64
        rows), its rows × half CONSUMER of the tile's columns (one 128-column half, or 64
        columns through `h_desc`'s [64, 64] boxes), so that a tail takes both warpgroups
        for half as long instead of one for as long as a whole tile."""
        BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
        TILE_N: gl.constexpr = b_bufs.shape[1]
        HALVES: gl.constexpr = TILE_N // BLOCK_N
        gl.static_assert(HALVES == 1 or HALVES == 2, "one or two 128-column halves")
        c_smem = c_bufs.index(CONSUMER)
        n_tiles = gl.cdiv(H, TILE_N)
        used = tiles_in_use(work_ptr, num_work, TAIL_M)
        counter = 0
        first, end, step = program_tiles(used * n_tiles, CHUNK)
        for tile in range(first, end, step):
            pid_m, pid_n = ordered_tile_coords(tile, used, n_tiles, work_ptr, block_experts_ptr,
                                               offsets_ptr, True, GROUP_M, EXPERT_GROUPS,
                                               TAIL_M)
            col0 = pid_n * TILE_N  # the tile's first column
            first_slot, expert, rows = row_tile(work_ptr, block_experts_ptr, pid_m, TAIL_M)
            # Without tail tiles the tail branch is not compiled (dead code there crashed
            # Triton 3.6's lowering, as in the 16-bit GEMM1).
            whole = True
            if TAIL_M:
                whole = rows == _TILE_M
            if HALVES == 2 and W_PER_K:
                # Per-K weight scales over two halves: one `_piece` loop per warpgroup (a
                # second, the tail's column split, spilled 168 bytes into both, sm_90): a
                # tail's 64 rows are the first warpgroup's rows of a whole tile; the second
                # releases the stages meanwhile (a tie with the column split, session 21).
                if whole or CONSUMER == 0:
                    counter = _piece(
                        first_slot + CONSUMER * _HALF_M, col0, expert, as_ptr, ws_ptr, b2_ptr,
                        topk_weights_ptr, sorted_pairs_ptr, num_pairs, H, I, stride_asm,
                        stride_ask, stride_wse, stride_wsn, stride_wsk, stride_be, a_bufs,
                        b_bufs, ready, empty, counter, c_desc, c_smem, CONSUMER * _HALF_M, 0,
                        BLOCK_N, HALVES, BLOCK_K, NUM_BUFFERS, A_PER_K, A_GROUP_K, W_PER_K,
                        W_GROUP_N, W_GROUP_K, W_UNIFORM_N, HAS_BIAS, APPLY_WEIGHT, PARTIAL_N)
                else:
                    counter = release_steps(ready, empty, counter, I, BLOCK_K, NUM_BUFFERS)
            elif whole:
                counter = _piece(
                    first_slot + CONSUMER * _HALF_M, col0, expert, as_ptr, ws_ptr, b2_ptr,
                    topk_weights_ptr, sorted_pairs_ptr, num_pairs, H, I, stride_asm, stride_ask,
                    stride_wse, stride_wsn, stride_wsk, stride_be, a_bufs, b_bufs, ready, empty,
                    counter, c_desc, c_smem, CONSUMER * _HALF_M, 0, BLOCK_N, HALVES, BLOCK_K,
                    NUM_BUFFERS, A_PER_K, A_GROUP_K, W_PER_K, W_GROUP_N, W_GROUP_K,
                    W_UNIFORM_N, HAS_BIAS, APPLY_WEIGHT, PARTIAL_N)
            elif TAIL_M:
                if HALVES == 2:  # one whole 128-column half each
                    counter = _piece(
                        first_slot, col0 + CONSUMER * BLOCK_N, expert, as_ptr, ws_ptr, b2_ptr,
                        topk_weights_ptr, sorted_pairs_ptr, num_pairs, H, I, stride_asm,
                        stride_ask, stride_wse, stride_wsn, stride_wsk, stride_be, a_bufs,
                        b_bufs, ready, empty, counter, c_desc, c_smem, 0, CONSUMER * BLOCK_N,
                        BLOCK_N, 1, BLOCK_K, NUM_BUFFERS, A_PER_K, A_GROUP_K, W_PER_K,
                        W_GROUP_N, W_GROUP_K, W_UNIFORM_N, HAS_BIAS, APPLY_WEIGHT, PARTIAL_N)
                else:  # 64 columns each, a [64, 64] box in the same bytes as the tile's
                    h_smem = c_smem._reinterpret(h_desc.dtype, h_desc.block_type.shape,
                                                 h_desc.layout)
                    counter = _piece(
                        first_slot, col0 + CONSUMER * _HALF_M, expert, as_ptr, ws_ptr, b2_ptr,
                        topk_weights_ptr, sorted_pairs_ptr, num_pairs, H, I, stride_asm,
                        stride_ask, stride_wse, stride_wsn, stride_wsk, stride_be, a_bufs,
                        b_bufs, ready, empty, counter, h_desc, h_smem, 0, CONSUMER * _HALF_M,
                        _HALF_M, 1, BLOCK_K, NUM_BUFFERS, A_PER_K, A_GROUP_K, W_PER_K,
                        W_GROUP_N, W_GROUP_K, W_UNIFORM_N, HAS_BIAS, APPLY_WEIGHT, PARTIAL_N)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _gemm2_ws_kernel(
        a_desc,  # inter [capacity, I] in plan order, [128, BLOCK_K] boxes
        b_desc,  # w2 as [E·H, I], [TILE_N, BLOCK_K] boxes: one or two 128-column halves
        c_desc,  # out [capacity, H] in plan order, [64, BLOCK_N] boxes
        h_desc,  # the same, [64, 64] boxes (a tail tile's stores, 128-column tiles)
        as_ptr,  # inter's scales: as[slot · stride_asm + (k // A_GROUP_K) · stride_ask]
        ws_ptr,  # w2's: ws[e · s_we + (n // W_GROUP_N) · s_wn + (k // W_GROUP_K) · s_wk]
        b2_ptr,  # [E, H] (read only when HAS_BIAS)
        topk_weights_ptr,  # [M·k] fp32 (read only when APPLY_WEIGHT)
        sorted_pairs_ptr,  # [capacity] int32
        block_experts_ptr,  # [capacity / plan rows] int32
        work_ptr,  # TAIL_M: the work list, its length after it; else expert_offsets [E + 1]
        offsets_ptr,  # expert_offsets [E + 1] (read only when EXPERT_GROUPS)
        num_work,  # TAIL_M: the work list's length in entries; else E
        num_pairs, H, I, stride_asm, stride_ask, stride_wse, stride_wsn, stride_wsk,
        stride_be,
        TAIL_M: gl.constexpr, GROUP_M: gl.constexpr, NUM_BUFFERS: gl.constexpr,
        A_PER_K: gl.constexpr, A_GROUP_K: gl.constexpr,
        W_PER_K: gl.constexpr, W_GROUP_N: gl.constexpr, W_GROUP_K: gl.constexpr,
        W_UNIFORM_N: gl.constexpr, HAS_BIAS: gl.constexpr, APPLY_WEIGHT: gl.constexpr,
        PARTIAL_N: gl.constexpr, PREFETCH: gl.constexpr, EXPERT_GROUPS: gl.constexpr,
        CHUNK: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Persistent over (row tile, column tile) in `ordered_tile_coords` order (GROUP_M
        row tiles per column tile, with EXPERT_GROUPS never two experts' in a group; 1: row
        tile major); this program's own
        warpgroup is the producer, two more (most of the registers) the math. A stage's
        `empty` barrier counts both math warpgroups' releases."""
        gl.static_assert(num_warps == 4, "the producer is one warpgroup")
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        dtype: gl.constexpr = a_desc.dtype
        gl.static_assert(dtype == gl.float8e4nv, "fp8 operands (the 16-bit GEMM2 is Triton's)")
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
             (_consumer, (c_desc, h_desc, as_ptr, ws_ptr, b2_ptr, topk_weights_ptr,
                          sorted_pairs_ptr, block_experts_ptr, work_ptr, offsets_ptr, num_work,
                          num_pairs, H, I, stride_asm,
                          stride_ask, stride_wse, stride_wsn, stride_wsk, stride_be, a_bufs,
                          b_bufs, ready, empty, c_bufs, 0, TAIL_M, GROUP_M, BLOCK_K,
                          NUM_BUFFERS,
                          A_PER_K, A_GROUP_K, W_PER_K, W_GROUP_N, W_GROUP_K, W_UNIFORM_N,
                          HAS_BIAS, APPLY_WEIGHT, PARTIAL_N, EXPERT_GROUPS, CHUNK)),
             (_consumer, (c_desc, h_desc, as_ptr, ws_ptr, b2_ptr, topk_weights_ptr,
                          sorted_pairs_ptr, block_experts_ptr, work_ptr, offsets_ptr, num_work,
                          num_pairs, H, I, stride_asm,
                          stride_ask, stride_wse, stride_wsn, stride_wsk, stride_be, a_bufs,
                          b_bufs, ready, empty, c_bufs, 1, TAIL_M, GROUP_M, BLOCK_K,
                          NUM_BUFFERS,
                          A_PER_K, A_GROUP_K, W_PER_K, W_GROUP_N, W_GROUP_K, W_UNIFORM_N,
                          HAS_BIAS, APPLY_WEIGHT, PARTIAL_N, EXPERT_GROUPS, CHUNK))],
            [4, 4], [232, 232])


def gluon_gemm2(inter: torch.Tensor, inter_scale: torch.Tensor, a_strides: tuple[int, int],
                a_group_k: int | None, w2: torch.Tensor, w2_scale: torch.Tensor,
                w_layout: tuple[int, int, int, int, int], w_uniform_n: bool,
                b2: torch.Tensor | None, topk_weights: torch.Tensor | None, plan,
                out_dtype: torch.dtype, programs: int) -> torch.Tensor:
    """fp8 GEMM2 over the plan's row tiles into plan-order rows (`_gemm2_ws_kernel`).

    Args:
        inter: [capacity, I] fp8, plan order; inter_scale its scales, `a_strides` = (per
            slot, per K group), (0, 0) for a static scalar; `a_group_k` the K group of
            dynamic scales (None: static).
        w2: [E, H, I] fp8, contiguous; w2_scale with `w_layout` (`weight_scale_layout`'s
            tuple); `w_uniform_n`: one scale covers each column tile.
        b2: optional [E, H]. topk_weights: [M·k] fp32 to multiply each row by its pair's
            router weight, or None.
        plan: the `DispatchPlan` (128-row blocks, or 64 with the tail work list).
        programs: the persistent grid (one per SM; `_gluon.schedule` may launch one program
            per tile instead).
    Returns:
        [capacity, H] in `out_dtype`; rows of padding slots hold unspecified values.
    """
    _, hidden, inter_size = w2.shape
    out = torch.empty((plan.capacity, hidden), dtype=out_dtype, device=w2.device)
    work, num_work, tail_m = work_list(plan)
    dummy = plan.sorted_pairs  # stands in for absent tensors; never read
    halves = column_halves(hidden, w_layout[2] != 0, w_uniform_n, b2 is not None, out_dtype)
    grid, chunk = _gluon.schedule(programs, plan, cdiv(hidden, halves * BLOCK_N), w2,
                                  halves * BLOCK_N * inter_size, gemm=2)  # a column tile's weights
    launcher(_gemm2_ws_kernel)[grid](
        descriptor(inter, [BLOCK_M, BLOCK_K]), descriptor(w2, [halves * BLOCK_N, BLOCK_K]),
        descriptor(out, [HALF_M, BLOCK_N]), descriptor(out, [HALF_M, HALF_M]), inter_scale,
        w2_scale,
        dummy if b2 is None else b2, dummy if topk_weights is None else topk_weights,
        plan.sorted_pairs, plan.block_experts, work, plan.expert_offsets, num_work,
        plan.num_pairs, hidden, inter_size, a_strides[0], a_strides[1], *w_layout[:3],
        0 if b2 is None else b2.stride(0),
        TAIL_M=tail_m, GROUP_M=_gluon.gemm2_group_m(w2, by_size=False),
        NUM_BUFFERS=STAGES if halves == 1 else WIDE_STAGES,
        A_PER_K=a_group_k is not None,
        A_GROUP_K=a_group_k or 1, W_PER_K=w_layout[2] != 0, W_GROUP_N=w_layout[3],
        W_GROUP_K=w_layout[4], W_UNIFORM_N=w_uniform_n, HAS_BIAS=b2 is not None,
        APPLY_WEIGHT=topk_weights is not None,
        PARTIAL_N=hidden % (halves * BLOCK_N) != 0, PREFETCH=_gluon.PREFETCH_TILES_FP8,
        EXPERT_GROUPS=_gluon.EXPERT_GROUPS, CHUNK=chunk, num_warps=4,
    )
    return out
