"""16-bit GEMM1 of the plan path at 128-row tiles as a warp-specialised Gluon kernel (sm_90).

GEMM1 is ~60% of a bf16 prefill layer, and Triton's kernel ran it at ~74% of the bf16
peak (qwen3 M = 4096: 400 µs on an H200, bench/results/logs/
h200-20261202-fp8-stage-profile-s14-a6732f1.txt), its warps both issuing the gathered
A rows' copies and the MMAs. Here those jobs are split as in the fp8 kernel
(`moekit._gluon_gemm1`), whose producer this one shares:

    producer warpgroup    per 64-deep K step: the tile's A rows gathered from their
                          tokens' rows of hidden by 16-byte cp.async, the expert's gate
                          rows [128, 64] and up rows [128, 64] by TMA, 48 KB a stage,
                          into a ring of STAGES
    two math warpgroups   64 rows each (a tail tile's 64 rows: 64 columns each); gate
                          and up accumulate in the MMA itself (16-bit products need no
                          promotion), one K step's two MMAs left in flight while the stage
                          before them is released; epilogue: the router weight (on the
                          input), biases, the activation, stored in hidden's dtype by TMA in
                          plan order, as the Triton GEMM1 writes `inter` for GEMM2

Hidden's rows are always gathered: no pass writes them in plan order for 16-bit inputs.
"""

from __future__ import annotations

import torch

from moekit import _gluon
from moekit._gluon import BLOCK_M, HALF_M, HAVE_GLUON, descriptor, gluon_allowed, work_list
from moekit._gluon_gemm1 import GATED, group_m
from moekit._launch import launcher

if HAVE_GLUON:
    from moekit._experts_kernels import _activate
    from moekit._gluon import (
        entry_tile,
        fence_async_shared,
        first_entries,
        gl,
        gluon,
        paired_mainloop,
        prefetch_entry,
        program_tiles,
        row_tile,
        stage_ring,
        tile_coords,
        tiles_in_use,
        tma,
    )
    from moekit._gluon_gemm1 import _producer

# 128 × 128 × 64 two-byte K steps (the fp8 kernel's 128 bytes of K), 4 stages of 48 KB.
BLOCK_N, BLOCK_K, STAGES = 128, 64, 4
# Narrow column tiles (64 gate and 64 up columns): 32 KB a stage, so 6 stages.
NARROW_N, NARROW_STAGES = 64, 6
# Measured faster up to this hidden size (K of GEMM1): H200, per-kernel CUDA time inside
# the layer at M = 4096, tails on both warpgroups (bench/results/
# h200-20261203-gluon-gemm1-16bit-profile-tailsplit-s20a.json): 1.07–1.10× at H = 2048
# (olmoe, qwen3, deepseek-v2-lite), 1.05× at mixtral's 4096, 0.98× at deepseek-v3's 7168.
MAX_HIDDEN = 4096
_DTYPES = (torch.bfloat16, torch.float16)


def use_gluon_gemm1_16bit(hidden: torch.Tensor, w13: torch.Tensor, block_m: int,
                          activation: str) -> bool:
    """Whether the 16-bit GEMM1 runs as `_gemm1_ws16_kernel`: Gluon allowed (an sm_90
    GPU), bf16/fp16, 128-row tiles, a gated activation, whole column tiles (I a multiple
    of 128), H at most MAX_HIDDEN, contiguous 16-byte rows and bases (TMA and the 16-byte
    gathers), and hidden's element offsets within 32 bits (the producer's row offsets)."""
    if not gluon_allowed(w13):
        return False
    _, rows13, hidden_size = w13.shape
    return (
        w13.dtype in _DTYPES
        and hidden.dtype == w13.dtype
        and block_m == BLOCK_M
        and activation in GATED
        and (rows13 // 2) % BLOCK_N == 0
        and hidden_size % 16 == 0
        and hidden_size <= MAX_HIDDEN
        and w13.is_contiguous()
        and hidden.is_contiguous()
        and w13.data_ptr() % 16 == 0
        and hidden.data_ptr() % 16 == 0
        and hidden.numel() < 2**31
    )


if HAVE_GLUON:
    _TILE_M = gl.constexpr(BLOCK_M)  # globals a kernel reads must be constexpr objects
    _HALF_M = gl.constexpr(HALF_M)

    @gluon.jit
    def _epilogue(gate, up, desc, smem, first_row, first_col, expert, b13_ptr,
                  topk_weights_ptr, sorted_pairs_ptr, num_pairs, I, stride_be, alpha, limit,
                  ACTIVATION: gl.constexpr, HAS_BIAS: gl.constexpr,
                  WEIGHT_ON_INPUT: gl.constexpr):
        """Router weight (on the input: it scales the products, not the biases), biases,
        the activation; stored in `desc`'s dtype by TMA at (first_row, first_col) of
        `inter` from `smem` once the previous tile's store has left it."""
        WIDTH: gl.constexpr = gate.shape[1]
        rows_layout: gl.constexpr = gl.SliceLayout(1, gate.type.layout)
        cols_layout: gl.constexpr = gl.SliceLayout(0, gate.type.layout)
        if WEIGHT_ON_INPUT:  # every row of a warpgroup's 64 is the tile's (a busy half)
            slots = first_row + gl.arange(0, _HALF_M, layout=rows_layout)
            pair = gl.load(sorted_pairs_ptr + slots)
            weight = gl.load(topk_weights_ptr + pair, mask=pair < num_pairs, other=0.0)
            gate = gate * weight[:, None]
            up = up * weight[:, None]
        if HAS_BIAS:
            cols = first_col + gl.arange(0, WIDTH, layout=cols_layout)
            b_base = b13_ptr + expert.to(gl.int64) * stride_be
            gate = gate + gl.load(b_base + cols).to(gl.float32)[None, :]
            up = up + gl.load(b_base + I + cols).to(gl.float32)[None, :]
        act = _activate(gate, up, ACTIVATION, alpha, limit)
        tma.store_wait(pendings=0)
        smem.store(act.to(desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(desc, [first_row, first_col], smem)

    @gluon.jit
    def _consumer16(o_desc, h_desc, b13_ptr, topk_weights_ptr, sorted_pairs_ptr, num_pairs,
                    block_experts_ptr, work_ptr, num_work, H, I, stride_be, alpha, limit,
                    a_bufs, g_bufs, u_bufs, ready, empty, o_bufs, CONSUMER: gl.constexpr,
                    TAIL_M: gl.constexpr, GROUP_M: gl.constexpr, NUM_BUFFERS: gl.constexpr,
                    ACTIVATION: gl.constexpr, HAS_BIAS: gl.constexpr,
                    WEIGHT_ON_INPUT: gl.constexpr, PREFETCH: gl.constexpr,
                    CHUNK: gl.constexpr):
        """Math warpgroup CONSUMER of every tile: rows [CONSUMER·64, +64) × the tile's 128
        columns, or, in a tail tile (64 rows), its rows × columns [CONSUMER·64, +64), so
        that a tail takes both warpgroups for half as long instead of one for as long as
        a whole tile (the fp8 GEMM1 idles one: its split measured slower, bench/NOTES.md
        session 21)."""
        BLOCK_N: gl.constexpr = o_desc.block_type.shape[1]
        TAIL_N: gl.constexpr = BLOCK_N // 2  # a tail tile's columns per warpgroup
        o_smem = o_bufs.index(CONSUMER)
        n_tiles = I // BLOCK_N
        used = tiles_in_use(work_ptr, num_work, TAIL_M)
        total = used * n_tiles
        first, end, step = program_tiles(total, CHUNK)
        if PREFETCH:  # as the producer: the next tile's rows and expert during this one
            first_slot, expert, rows, entry = first_entries(
                first, step, total, used, n_tiles, work_ptr, block_experts_ptr, GROUP_M,
                TAIL_M)
        counter = 0
        for tile in range(first, end, step):
            pid_m, pid_n = tile_coords(tile, used, n_tiles, GROUP_M)
            if PREFETCH:
                tile_slot = first_slot
                tile_expert = expert
                tile_rows = rows
                first_slot, expert, rows = entry_tile(entry, block_experts_ptr, TAIL_M)
                entry = prefetch_entry(tile + 2 * step, total, used, n_tiles, work_ptr, GROUP_M,
                                       TAIL_M)
            else:
                tile_slot, tile_expert, tile_rows = row_tile(work_ptr, block_experts_ptr,
                                                             pid_m, TAIL_M)
            # Without tail tiles the tail branch is not compiled at all (constexpr TAIL_M):
            # left in as dead code, its epilogue's loads crashed Triton 3.6's lowering.
            whole = True
            if TAIL_M:
                whole = tile_rows == _TILE_M
            if whole:
                gate, up, counter = paired_mainloop(
                    a_bufs, g_bufs, u_bufs, ready, empty, counter, H, CONSUMER * _HALF_M, 0, 0,
                    BLOCK_N, NUM_BUFFERS, True)
                _epilogue(gate, up, o_desc, o_smem, tile_slot + CONSUMER * _HALF_M,
                          pid_n * BLOCK_N, tile_expert, b13_ptr, topk_weights_ptr,
                          sorted_pairs_ptr, num_pairs, I, stride_be, alpha, limit,
                          ACTIVATION, HAS_BIAS, WEIGHT_ON_INPUT)
            elif TAIL_M:
                # A tail's [64, TAIL_N] store box, in the same bytes as the whole tile's;
                # names of their own (a branch's values may not change type).
                h_smem = o_smem._reinterpret(h_desc.dtype, h_desc.block_type.shape,
                                             h_desc.layout)
                half_gate, half_up, counter = paired_mainloop(
                    a_bufs, g_bufs, u_bufs, ready, empty, counter, H, 0, CONSUMER * TAIL_N,
                    CONSUMER * TAIL_N, TAIL_N, NUM_BUFFERS, True)
                _epilogue(half_gate, half_up, h_desc, h_smem, tile_slot,
                          pid_n * BLOCK_N + CONSUMER * TAIL_N, tile_expert, b13_ptr,
                          topk_weights_ptr, sorted_pairs_ptr, num_pairs, I, stride_be, alpha,
                          limit, ACTIVATION, HAS_BIAS, WEIGHT_ON_INPUT)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _gemm1_ws16_kernel(
        a_desc,  # hidden [M, H] (its box layout only: rows are gathered by cp.async)
        b_desc,  # w13 as [E·2I, H], [BLOCK_N, BLOCK_K] boxes
        o_desc,  # inter [capacity, I] in plan order, [64, BLOCK_N] boxes
        h_desc,  # the same, [64, 64] boxes (a tail tile's stores)
        x_ptr,  # hidden [M, H] (row stride stride_xm)
        b13_ptr,  # [E, 2I] (read only when HAS_BIAS)
        topk_weights_ptr,  # [M·k] fp32 (read only when WEIGHT_ON_INPUT)
        sorted_pairs_ptr,  # [capacity] int32: slot → pair
        block_experts_ptr,  # [capacity / plan rows] int32
        work_ptr,  # TAIL_M: the work list, its length after it; else expert_offsets [E + 1]
        num_work,  # TAIL_M: the work list's length in entries; else E
        num_pairs, top_k, H, I, stride_xm, stride_be, alpha, limit,
        TAIL_M: gl.constexpr, GROUP_M: gl.constexpr, NUM_BUFFERS: gl.constexpr,
        ACTIVATION: gl.constexpr, HAS_BIAS: gl.constexpr, WEIGHT_ON_INPUT: gl.constexpr,
        PREFETCH: gl.constexpr, CHUNK: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Persistent over (row tile, 128 intermediate columns) in `tile_coords` order;
        this program's own warpgroup is the producer (`_producer`, gathering A), two
        more the math."""
        gl.static_assert(num_warps == 4, "the producer is one warpgroup")
        dtype: gl.constexpr = a_desc.dtype
        gl.static_assert(dtype.primitive_bitwidth == 16, "16-bit operands")
        a_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS] + a_desc.block_type.shape,
                                           a_desc.layout)
        g_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS] + b_desc.block_type.shape,
                                           b_desc.layout)
        u_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS] + b_desc.block_type.shape,
                                           b_desc.layout)
        o_bufs = gl.allocate_shared_memory(o_desc.dtype, [2] + o_desc.block_type.shape,
                                           o_desc.layout)
        # Each of the producer's 128 threads arrives when its copies land.
        ready, empty = stage_ring(NUM_BUFFERS, 129)
        gl.warp_specialize(
            [(_producer, (a_desc, b_desc, a_desc, x_ptr, stride_xm, sorted_pairs_ptr, num_pairs,
                          top_k, block_experts_ptr, work_ptr, num_work, H, I, a_bufs, g_bufs,
                          u_bufs, a_bufs, ready, empty, TAIL_M, GROUP_M, NUM_BUFFERS, True,
                          False, 1, PREFETCH, CHUNK)),  # (no staged scales: a_* unread)
             (_consumer16, (o_desc, h_desc, b13_ptr, topk_weights_ptr, sorted_pairs_ptr, num_pairs,
                            block_experts_ptr, work_ptr, num_work, H, I, stride_be, alpha,
                            limit, a_bufs, g_bufs, u_bufs, ready, empty, o_bufs, 0, TAIL_M,
                            GROUP_M, NUM_BUFFERS, ACTIVATION, HAS_BIAS, WEIGHT_ON_INPUT,
                            PREFETCH, CHUNK)),
             (_consumer16, (o_desc, h_desc, b13_ptr, topk_weights_ptr, sorted_pairs_ptr, num_pairs,
                            block_experts_ptr, work_ptr, num_work, H, I, stride_be, alpha,
                            limit, a_bufs, g_bufs, u_bufs, ready, empty, o_bufs, 1, TAIL_M,
                            GROUP_M, NUM_BUFFERS, ACTIVATION, HAS_BIAS, WEIGHT_ON_INPUT,
                            PREFETCH, CHUNK))],
            [4, 4], [232, 232])


def gluon_gemm1_16bit(hidden: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor | None,
                      topk_weights: torch.Tensor, plan, activation: str, alpha: float,
                      limit: float, weight_on_input: bool, programs: int,
                      block_n: int = BLOCK_N) -> torch.Tensor:
    """GEMM1 + activation over the plan's row tiles (`_gemm1_ws16_kernel`); returns
    `inter` [capacity, I] in plan order, as `moekit.experts.launch_gemm1` does.

    Args:
        hidden: [M, H] bf16/fp16, contiguous; w13: [E, 2I, H] (gate rows, then up), same
            dtype, contiguous; b13: optional [E, 2I].
        topk_weights: [M·k] fp32, read when `weight_on_input`.
        plan: the `DispatchPlan` (128-row blocks, or 64 with the tail work list).
        programs: the persistent grid (one per SM; `_gluon.schedule` may launch one program
            per tile instead).
        block_n: the column tile (gate and up columns each): BLOCK_N, or NARROW_N for twice
            the tiles, each streaming half the weight rows.
    """
    if block_n not in (BLOCK_N, NARROW_N):
        raise ValueError(f"block_n: expected {BLOCK_N} or {NARROW_N}, got {block_n}")
    num_tokens, hidden_size = hidden.shape
    inter_size = w13.shape[1] // 2
    if inter_size % block_n:
        raise ValueError(f"I = {inter_size}: expected whole column tiles of {block_n}")
    inter = torch.empty((plan.capacity, inter_size), dtype=hidden.dtype, device=hidden.device)
    work, num_work, tail_m = work_list(plan)
    grid, chunk = _gluon.schedule(programs, plan, inter_size // block_n)
    launcher(_gemm1_ws16_kernel)[grid](
        descriptor(hidden, [BLOCK_M, BLOCK_K]), descriptor(w13, [block_n, BLOCK_K]),
        descriptor(inter, [HALF_M, block_n]), descriptor(inter, [HALF_M, block_n // 2]), hidden,
        plan.sorted_pairs if b13 is None else b13, topk_weights, plan.sorted_pairs,
        plan.block_experts, work, num_work, plan.num_pairs, plan.num_pairs // num_tokens,
        hidden_size, inter_size, hidden.stride(0), 0 if b13 is None else b13.stride(0),
        float(alpha), float(limit),
        TAIL_M=tail_m, GROUP_M=group_m(w13),
        NUM_BUFFERS=STAGES if block_n == BLOCK_N else NARROW_STAGES, ACTIVATION=activation,
        HAS_BIAS=b13 is not None, WEIGHT_ON_INPUT=weight_on_input,
        PREFETCH=_gluon.PREFETCH_TILES, CHUNK=chunk, num_warps=4,
    )
    return inter
