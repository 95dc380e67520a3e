"""fp8 GEMM1 of the plan path at 128-row tiles as a warp-specialised Gluon kernel (sm_90).

GEMM1 is the larger half of fp8 prefill, and Triton's kernel ran it at ~37–55% of the
fp8 peak (qwen3 M = 4096 per-tensor: 375 µs on an H200). Its A rows are gathered — each
(token, expert) pair reads its token's row — and Hopper's TMA cannot gather. So either
the producer gathers them itself, 16-byte cp.async copies from hidden quantised once per
token (`gather_rows`: from 4 experts per token, input scales constant along K), or the
quantiser writes each token's fp8 row to its pairs' plan slots (`launch_quantize_rows`
with `pair_slots`: [capacity, H], padding slots unwritten) and every operand travels by
TMA, as in the Gluon GEMM2 (`moekit._gluon_gemm2`):

    producer warpgroup    per 128-deep K step: A [128, 128] (plan rows by TMA, or token
                          rows by cp.async), the expert's gate rows [128, 128] and up
                          rows [128, 128] by TMA, 48 KB a stage, into a ring of STAGES
    two math warpgroups   64 rows each; the gate and up products promoted per stage into
                          two fp32 accumulators, each product first scaled by its K
                          step's scales where they vary along K (hidden's 1×128 groups,
                          w13's 128×128 blocks); epilogue: the scales constant along K
                          (input per slot or one; weight per expert or per channel),
                          biases, the activation, then GEMM2's input quantised — its own
                          1×128 group per row (the tile's 128 columns), or the static
                          scale — and stored by TMA, its scales by pointer

Scales varying along K need whole K steps per group and one weight scale per column tile
— or two per up tile, where I is not a multiple of 128-row weight blocks (gpt-oss's 2880:
each up tile straddles two blocks; `split_up_scales`) — and biases with them only in
gpt-oss's form (`takes_biases`: the biases start the sums; elsewhere Triton's GEMM1 runs
them). The per-step scaling multiplies the product in its own registers: `part` is the
next MMA's accumulator operand, and a scaled copy of it (a fourth [64, 128] fp32 value)
spilled 960 bytes and ran 1.3–1.6× slower than Triton's kernel (bench/results/
h200-20261202-gluon-gemm1-experiment.md); in place, block scales ran 0.65–0.76× Triton's
time (`…-gluon-gemm1-experiment-s14.md`).

Measured in the fp8 layer (H200, torch.profiler, bench/results/logs/
h200-20261202-fp8-stage-profile-s13-*): qwen3 M = 4096 per-tensor 229 µs against the
Triton GEMM1's 375 (the quantiser's plan-order writes cost 13 µs more), per-channel 235;
mixtral 1,877 against 2,261; the layer 1.04–1.27× faster at M = 4096–16384 in graph
replay (`*-fp8_{tensor,channel}-prefill-s13b.md` against `-s12.md`, two H200 hosts).
Block scales (`logs/h200-20261202-fp8-stage-profile-s14-*`): qwen3 M = 4096 239 µs
against the Triton GEMM1's ~430; the layer 1.27–1.34× faster at M = 4096–16384
(`*-fp8_block-prefill-s14b.md` against `-s13b.md`).
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
    l2_bytes_of,
    work_list,
)
from moekit._intmath import cdiv
from moekit._launch import launcher
from moekit.quant.scheme import FULL

if HAVE_GLUON:
    from triton.experimental.gluon.language.nvidia.ampere import async_copy

    from moekit._experts_fp8_kernels import _scale_from_amax
    from moekit._experts_kernels import _activate
    from moekit._gluon import (
        entry_tile,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        prefetch_entry,
        program_tiles,
        release_steps,
        row_tile,
        stage_ring,
        tile_coords,
        tiles_in_use,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

# 128 × 128 × 128 one-byte K steps, 4 stages of 48 KB (A, gate, up): the shape measured.
BLOCK_N, BLOCK_K, STAGES = 128, 128, 4
# Row tiles side by side over each column tile where one expert's w13 outgrows L2.
GROUP_M = 8
# From this many experts per token the producer gathers each tile's A rows itself
# (`gather_rows`). H200 (bench/results/h200-20261202-gluon-gather-experiment.md): the
# quantiser 2.5–3× faster, GEMM1 up to 10% slower (its producer's 16-byte copies), the
# layer 1–4% faster at k = 8; at k = 2 (mixtral) the copies saved do not repay GEMM1's loss.
GATHER_MIN_TOP_K = 4
GATED = ("silu", "gelu", "gelu_tanh", "swigluoai")  # relu2 (one projection): Triton's
# Measurement controls, read at import: `MOEKIT_GLUON_STAGED_SCALES=1` (hidden's per-K
# scales through the stage, `stage_input_scales`), `MOEKIT_GLUON_GEMM1_REGISTERS`
# (`worker_registers`).
STAGED_SCALES_ENV = os.environ.get("MOEKIT_GLUON_STAGED_SCALES")
REGISTERS_ENV = os.environ.get("MOEKIT_GLUON_GEMM1_REGISTERS")


def use_gluon_gemm1(w13: torch.Tensor, block_m: int, activation: str, input_group_k: int,
                    weight_group: tuple[int, int], inter_group: int | None,
                    has_bias: bool) -> bool:
    """Whether GEMM1 runs as `_gemm1_ws_kernel`: Gluon allowed (an sm_90 GPU), fp8
    weights, 128-row tiles, a gated activation, 16-byte rows and base (I's too: the last
    column tile may be partial, as gpt-oss's I = 2880), GEMM2's input quantised
    statically (`inter_group` None) or in the tile's own 1×128 groups, and scales varying
    along K only in groups of whole K steps: hidden's (`input_group_k`; FULL: constant)
    and w13's (`weight_group`, (n, k)), whose scale must then be one per column tile (a
    scalar per step), or two per up tile at groups of BLOCK_N rows (`split_up_scales`).
    Biases with scales along K run only in gpt-oss's form (`takes_biases`)."""
    if not gluon_allowed(w13) or not _gluon.fp8_gemm1_allowed():
        return False
    _, rows13, hidden = w13.shape
    inter = rows13 // 2
    group_n, group_k = weight_group
    k_groups = [g for g in (input_group_k, group_k) if g != FULL]
    return (
        w13.dtype == torch.float8_e4m3fn
        and block_m == BLOCK_M
        and activation in GATED
        and all(g % BLOCK_K == 0 for g in k_groups)
        and (not has_bias or takes_biases(k_groups, group_n, inter))
        and (group_k == FULL or group_n == FULL or group_n == BLOCK_N
             or (group_n % BLOCK_N == 0 and inter % group_n == 0))
        and inter_group in (None, BLOCK_N)
        and inter % 16 == 0
        and hidden % 16 == 0
        and w13.is_contiguous()
        and w13.data_ptr() % 16 == 0  # TMA's base alignment
    )


def takes_biases(k_groups: list[int], group_n: int, inter: int) -> bool:
    """Whether biases run here with these scales (`k_groups`: the finite K groups of
    hidden and w13). Constant along K: yes, added in the epilogue. Along K, only in
    gpt-oss's form: both operands' scales along K and 128-row weight blocks straddling
    the up tiles (I = 2880). The biases then start the sums and the sm_90 compile spills
    52 bytes (2 stores, 4 loads a K step in one warpgroup); the layer ran 1.50–1.64×
    faster than with Triton's GEMM1 at M = 4096–16384 on an H100 (bench/results/
    h100-sxm-20261206-fp8-block-bias-s58.md, -s58b.md). On whole blocks (I = 2816) it
    spills 260 (20 stores a K step) and ran 1.22× at M = 4096 but 0.93× at 16384; after
    one operand's scales, in the epilogue, the biases spilled ~300 bytes."""
    if not k_groups:
        return True
    return len(k_groups) == 2 and _up_tiles_straddle(group_n, inter)


def _up_tiles_straddle(group_n: int, inter: int) -> bool:
    """Whether weight groups of `group_n` rows cut every up column tile in two: groups of
    BLOCK_N rows with I not a multiple of them (the gate tiles start at row 0 and never do)."""
    return group_n == BLOCK_N and inter % BLOCK_N != 0


def split_up_scales(w_layout: tuple[int, int, int, int, int], w_uniform_n: bool,
                    inter: int) -> int:
    """Where w13's per-K scales change inside each up column tile (0: nowhere). In groups
    of BLOCK_N rows (128×128 blocks) with I not a multiple of them (gpt-oss's 2880 = 22.5
    blocks), every up tile straddles two groups at column (−I) mod BLOCK_N; the gate
    tiles never do. The kernel picks one of two scalars per register there."""
    stride_n, stride_k, group_n = w_layout[1], w_layout[2], w_layout[3]
    if w_uniform_n or stride_k == 0 or stride_n == 0 or not _up_tiles_straddle(group_n, inter):
        return 0
    return -inter % BLOCK_N


def stage_input_scales() -> bool:
    """Whether hidden's per-K scales reach the math warpgroups through the stage: written
    transposed by the quantiser ([K groups, capacity]), a step's 128 slot scales are one
    512-byte TMA box the producer loads beside A, read from shared memory after the stage's
    barrier. By pointer they were the GEMM1's largest stall in block-scaled cells (bench/
    NOTES.md, session 59: ~12.7 K of the math warpgroups' samples at gpt-oss M = 8192 on
    each step's FMUL waiting for its row scales' LDG). sm_90 compiles spill nothing with
    them staged, in gpt-oss's form with `worker_registers`' split (session 60). Measured
    (H100, two rounds, session 61) against by pointer: whole blocks 1.001–1.020× (qwen3,
    deepseek-v3 M = 4096–8192; H200, session 60: 0.985–1.031), gpt-oss M = 4096 1.05×
    but 8192–16384 0.95–0.98× — not a gain, so off: `MOEKIT_GLUON_STAGED_SCALES=1` (read
    at import) turns it on."""
    return STAGED_SCALES_ENV == "1"


def worker_registers(split_n: int, has_bias: bool) -> tuple[int, int]:
    """Registers per thread of the two math warpgroups, as listed to `warp_specialize`
    (the producer's 40 make up the 504 of three warpgroups at 168). Triton runs the
    partitions from one dispatch loop and ptxas allocates both in one function: in
    gpt-oss's form (up tiles straddling weight blocks, with biases) only the first-listed
    warpgroup's K loop spilled at 232 each — 2 stores a step by pointer, 19 with the
    scales staged — and none at 248 and 216 (sm_90, bench/NOTES.md session 60); whole
    blocks spill 208–236 bytes at that split and none at 232 each.
    `MOEKIT_GLUON_GEMM1_REGISTERS` ("first,second", read at import) sets them for every
    form (a measurement control)."""
    if REGISTERS_ENV is not None:
        first, second = (int(v) for v in REGISTERS_ENV.split(","))
        return first, second
    return (248, 216) if split_n and has_bias else (232, 232)


def gather_rows(top_k: int, hidden: torch.Tensor, input_group_k: int) -> bool:
    """Whether GEMM1 gathers its A rows by cp.async from hidden quantised once per token
    ([M, H]), instead of TMA over rows the quantiser wrote to each pair's plan slot (k
    copies of hidden: 67 MB of fp8 at qwen3 M = 4096): k ≥ GATHER_MIN_TOP_K, input scales
    constant along K (per-K ones indexed by token would hold a second row index through
    the K loop: 12 bytes of spill), row offsets within 32 bits."""
    return (top_k >= GATHER_MIN_TOP_K and input_group_k == FULL
            and hidden.numel() < 2**31)


def group_m(w13: torch.Tensor, l2: int | None = None) -> int:
    """Row tiles per group of the tile order (`tile_coords`): GROUP_M where one expert's
    w13 is larger than L2 (`l2`, default the device's), so that a row tile's sweep over
    the column tiles would evict what the expert's next row tile needs; else 1 (row tile
    major). H200 (bench/results/h200-20261202-gluon-order-promote-experiment.md): mixtral
    (117 MB per expert) GEMM1 1.02–1.24× faster grouped; qwen3 (3 MB) and deepseek-v3
    (29 MB) 3–4% slower. `_gluon.GEMM1_GROUP_M_ENV` overrides it (a measurement
    control)."""
    override = os.environ.get(_gluon.GEMM1_GROUP_M_ENV)
    if override is not None:
        return int(override)
    _, rows13, hidden = w13.shape
    l2 = l2_bytes_of(w13) if l2 is None else l2
    return GROUP_M if rows13 * hidden * w13.element_size() > l2 else 1


if HAVE_GLUON:
    _HALF_M = gl.constexpr(HALF_M)  # globals a kernel reads must be constexpr objects

    @gluon.jit
    def _producer(a_desc, b_desc, xs_desc, x_ptr, stride_xm, sorted_pairs_ptr, num_pairs,
                  top_k, block_experts_ptr, work_ptr, num_work, H, I, a_bufs, g_bufs, u_bufs,
                  xs_bufs, ready, empty, TAIL_M: gl.constexpr, GROUP_M: gl.constexpr,
                  NUM_BUFFERS: gl.constexpr, GATHER_A: gl.constexpr, X_STAGED: gl.constexpr,
                  X_GROUP_K: gl.constexpr, PREFETCH: gl.constexpr, CHUNK: gl.constexpr):
        """Loads of every K step's A, gate and up tiles into the ring, each stage reloaded
        once both math warpgroups have released it: all by TMA, or (GATHER_A) A's rows by
        cp.async from their tokens' rows of x, each thread's copies arriving on the
        stage's barrier as they land (`ready` then counts 128 arrivals more). X_STAGED:
        also the step's hidden scales of the tile's slots, one [1, BLOCK_M] box of the
        transposed scales (`stage_input_scales`).

        PREFETCH: a tile's expert and slots' pairs are loaded during the tile before's K
        loop, its work entry during the one before that, so no load at a tile's start
        waits; else each tile start waits on its work entry, then on its expert and pairs
        (~20% of the producer's stall samples at granite M = 512, bench/NOTES.md session
        25), while the ring drains."""
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        # 16 bytes per thread and copy (16 fp8 or 8 16-bit values); a K step's row slice
        # (128 bytes in both kernels) per BLOCK_K / VEC = 8 threads.
        VEC: gl.constexpr = 128 // a_desc.dtype.primitive_bitwidth
        ROW_THREADS: gl.constexpr = BLOCK_K // VEC
        gather_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // ROW_THREADS, ROW_THREADS],
                                                       [4, 1], [1, 0])
        gather_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, gather_layout))
        gather_cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, gather_layout))
        n_tiles = gl.cdiv(I, BLOCK_N)
        used = tiles_in_use(work_ptr, num_work, TAIL_M)
        total = used * n_tiles
        first, end, step = program_tiles(total, CHUNK)
        if PREFETCH:  # the first tile's loads, and the second's work entry
            first_slot, expert, pair = _tile_loads(
                prefetch_entry(first, total, used, n_tiles, work_ptr, GROUP_M, TAIL_M),
                sorted_pairs_ptr, block_experts_ptr, gather_rows, num_pairs, TAIL_M, GATHER_A)
            entry = prefetch_entry(first + step, total, used, n_tiles, work_ptr, GROUP_M,
                                   TAIL_M)
        counter = 0
        for tile in range(first, end, step):
            pid_m, pid_n = tile_coords(tile, used, n_tiles, GROUP_M)
            if PREFETCH:
                tile_slot = first_slot
                tile_expert = expert
                if GATHER_A:
                    tile_pair = pair
                first_slot, expert, pair = _tile_loads(entry, sorted_pairs_ptr,
                                                       block_experts_ptr, gather_rows,
                                                       num_pairs, TAIL_M, GATHER_A)
                entry = prefetch_entry(tile + 2 * step, total, used, n_tiles, work_ptr, GROUP_M,
                                       TAIL_M)
            else:
                tile_slot, tile_expert, rows = row_tile(work_ptr, block_experts_ptr, pid_m,
                                                        TAIL_M)
                if GATHER_A:
                    tile_pair = gl.load(sorted_pairs_ptr + tile_slot + gather_rows,
                                        mask=gather_rows < rows, other=num_pairs)
            # A partial last column tile reads on into the up rows (and those into the
            # next expert's, or TMA's zeros): columns the epilogue drops.
            gate_row = tile_expert * 2 * I + pid_n * BLOCK_N  # [E·2I, H] view
            if GATHER_A:  # each slot's token row, as a 32-bit offset (the producer has 40
                # registers); padding slots' rows, −16 (16-byte copies need multiples of
                # 16), are zero-filled
                token_rows = gl.where(tile_pair < num_pairs, tile_pair // top_k * stride_xm,
                                      -16)
            for k in range(0, H, BLOCK_K):
                index = counter % NUM_BUFFERS
                # A fresh barrier is in phase 0: waiting for parity 1 passes at once.
                mbarrier.wait(empty.index(index), ((counter // NUM_BUFFERS) & 1) ^ 1)
                bar = ready.index(index)
                if GATHER_A:
                    cols = k + gather_cols
                    async_copy.async_copy_global_to_shared(
                        a_bufs.index(index), x_ptr + (token_rows[:, None] + cols[None, :]),
                        mask=(token_rows >= 0)[:, None] & (cols < H)[None, :])
                    async_copy.mbarrier_arrive(bar, increment_count=False)
                    mbarrier.expect(bar, 2 * b_desc.block_type.nbytes)
                elif X_STAGED:
                    mbarrier.expect(bar, a_desc.block_type.nbytes
                                    + 2 * b_desc.block_type.nbytes + xs_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(a_desc, [tile_slot, k], bar,
                                                    a_bufs.index(index))
                    tma.async_copy_global_to_shared(xs_desc, [k // X_GROUP_K, tile_slot], bar,
                                                    xs_bufs.index(index))
                else:
                    mbarrier.expect(bar, a_desc.block_type.nbytes
                                    + 2 * b_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(a_desc, [tile_slot, k], bar,
                                                    a_bufs.index(index))
                tma.async_copy_global_to_shared(b_desc, [gate_row, k], bar, g_bufs.index(index))
                tma.async_copy_global_to_shared(b_desc, [gate_row + I, k], bar,
                                                u_bufs.index(index))
                counter += 1

    @gluon.jit
    def _tile_loads(entry, sorted_pairs_ptr, block_experts_ptr, gather_rows, num_pairs,
                    TAIL_M: gl.constexpr, GATHER_A: gl.constexpr):
        """A work entry's first slot, expert and (GATHER_A) its slots' pairs, padding
        slots' as num_pairs; loads only, so nothing here waits on them."""
        first_slot, expert, rows = entry_tile(entry, block_experts_ptr, TAIL_M)
        pair = rows
        if GATHER_A:
            pair = gl.load(sorted_pairs_ptr + first_slot + gather_rows,
                           mask=gather_rows < rows, other=num_pairs)
        return first_slot, expert, pair

    @gluon.jit
    def _consumer(q_desc, xs_ptr, ws_ptr, b13_ptr, inter_scale_ptr, sorted_pairs_ptr,
                  num_pairs, top_k, block_experts_ptr, work_ptr, num_work, H, I, stride_xsm,
                  stride_xsk, stride_wse, stride_wsn, stride_wsk, stride_be, stride_ism, alpha,
                  limit, a_bufs, g_bufs, u_bufs, xs_bufs, ready, empty, q_bufs,
                  CONSUMER: gl.constexpr,
                  TAIL_M: gl.constexpr, GROUP_M: gl.constexpr, NUM_BUFFERS: gl.constexpr,
                  GATHER_A: gl.constexpr, ACTIVATION: gl.constexpr,
                  X_PER_K: gl.constexpr, X_GROUP_K: gl.constexpr, X_STAGED: gl.constexpr,
                  W_PER_K: gl.constexpr, W_GROUP_N: gl.constexpr, W_GROUP_K: gl.constexpr,
                  W_UNIFORM_N: gl.constexpr, W_SPLIT_N: gl.constexpr, HAS_BIAS: gl.constexpr,
                  INTER_STATIC: gl.constexpr, PARTIAL_N: gl.constexpr, FMAX: gl.constexpr,
                  AMAX_FLOOR: gl.constexpr, CHUNK: gl.constexpr):
        """Math warpgroup CONSUMER: rows [CONSUMER·64, +64) of every tile. Each stage's
        gate and up products go into a fresh accumulator, are scaled by the step's K-group
        scales (X_PER_K: hidden's per slot, X_STAGED from the stage; W_PER_K: w13's, one
        per column tile; loaded while the MMA runs) and added in fp32 (Hopper's fp8 MMA
        accumulates at reduced precision). Each product is scaled in its own registers
        before the add: `part` is the next MMA's accumulator operand, and a separate scaled
        copy of it spilled 960 bytes. Scales constant along K, the biases and the
        activation follow in the epilogue, as `_gate_up` does, then the quantisation of
        `_store_inter`."""
        BLOCK_N: gl.constexpr = q_desc.block_type.shape[1]
        BLOCK_M: gl.constexpr = a_bufs.shape[1]
        BLOCK_K: gl.constexpr = a_bufs.shape[2]
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32])
        rows_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        cols_layout: gl.constexpr = gl.SliceLayout(0, mma_layout)
        offs_r = gl.arange(0, _HALF_M, layout=rows_layout)
        offs_c = gl.arange(0, BLOCK_N, layout=cols_layout)
        part = gl.zeros((_HALF_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
        q_smem = q_bufs.index(CONSUMER)
        n_tiles = gl.cdiv(I, BLOCK_N)
        used = tiles_in_use(work_ptr, num_work, TAIL_M)
        counter = 0
        first, end, step = program_tiles(used * n_tiles, CHUNK)
        for tile in range(first, end, step):
            pid_m, pid_n = tile_coords(tile, used, n_tiles, GROUP_M)
            first_slot, expert, rows = row_tile(work_ptr, block_experts_ptr, pid_m, TAIL_M)
            busy = rows > CONSUMER * _HALF_M  # a tail's rows are all in the first half
            # This warpgroup's slots, 32-bit (a [capacity, H / 128] scale index fits):
            # registers held across the K loop are what the epilogue runs short of.
            slots = first_slot + CONSUMER * _HALF_M + offs_r  # [_HALF_M]
            ws_base = ws_ptr + expert.to(gl.int64) * stride_wse
            # Padding slots' rows and scales were never written: their products are
            # noise, row-local, and GEMM2 and the combine never read them into a token's
            # sum. Loaded before `busy` is known, the constant scales are masked to the
            # tile's rows (an idle tail half's slots may lie past the plan); the per-K
            # ones are read only when busy, where every slot is the tile's.
            if not X_PER_K:
                mine = CONSUMER * _HALF_M + offs_r < rows
                x_index = slots
                if GATHER_A:  # hidden's scales are its tokens' (padding slots: token 0's)
                    pair = gl.load(sorted_pairs_ptr + slots, mask=mine, other=num_pairs)
                    x_index = gl.where(pair < num_pairs, pair // top_k, 0)
                x_rows = gl.load(xs_ptr + x_index * stride_xsm, mask=mine,
                                 other=0.0)  # hidden under the K loop
            if W_PER_K:  # one scale per column tile and K group, or W_SPLIT_N two for up
                gate_ws = ws_base + (pid_n * BLOCK_N // W_GROUP_N) * stride_wsn
                up_group = (I + pid_n * BLOCK_N) // W_GROUP_N
                up_ws = ws_base + up_group * stride_wsn
                if W_SPLIT_N:  # columns from W_SPLIT_N on: the next group's (none past the
                    # expert's last row: then they are the partial tile's dropped columns)
                    up_ws_hi = ws_base + gl.minimum(up_group + 1, (2 * I - 1) // W_GROUP_N) \
                        * stride_wsn
            gate = gl.zeros((_HALF_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
            up = gl.zeros((_HALF_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
            if HAS_BIAS and X_PER_K and W_PER_K:  # every scale applied per K step: the
                # biases start the sums (`takes_biases`), addressed from the tile's first
                # column (an expression shared with the epilogue's `cols` would stay live
                # through the K loop)
                b_tile = b13_ptr + expert.to(gl.int64) * stride_be + pid_n * BLOCK_N
                real = offs_c < I - pid_n * BLOCK_N
                gate = gate + gl.load(b_tile + offs_c, mask=real,
                                      other=0.0).to(gl.float32)[None, :]
                up = up + gl.load(b_tile + I + offs_c, mask=real,
                                  other=0.0).to(gl.float32)[None, :]
            if busy:
                for k in range(0, H, BLOCK_K):
                    index = counter % NUM_BUFFERS
                    mbarrier.wait(ready.index(index), (counter // NUM_BUFFERS) & 1)
                    if GATHER_A:  # cp.async wrote A through the generic proxy
                        fence_async_shared()
                    a = a_bufs.index(index).slice(CONSUMER * _HALF_M, _HALF_M, dim=0)
                    part = warpgroup_mma(a, g_bufs.index(index).permute((1, 0)), part,
                                         use_acc=False, is_async=True)
                    # The step's scales, loaded while the MMA runs.
                    x_step = 1.0
                    if X_STAGED:  # from the stage (a 1-D view of its unswizzled box)
                        x_step = xs_bufs.index(index)._reinterpret(
                            gl.float32, [BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, [0])
                        ).slice(CONSUMER * _HALF_M, _HALF_M).load(rows_layout)
                    elif X_PER_K:
                        x_step = gl.load(xs_ptr + slots * stride_xsm
                                         + (k // X_GROUP_K) * stride_xsk)
                    gate_w = 1.0
                    up_w = 1.0
                    if W_PER_K:
                        w_k = (k // W_GROUP_K) * stride_wsk
                        gate_w = gl.load(gate_ws + w_k)
                        up_w = gl.load(up_ws + w_k)
                        if W_SPLIT_N:
                            up_w_hi = gl.load(up_ws_hi + w_k)
                    part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
                    # Scaled in place, one multiply per value (see the docstring); written
                    # out for gate and up: a helper returning the scaled product spilled
                    # 952 bytes.
                    if X_PER_K and W_PER_K:
                        part = part * (x_step * gate_w)[:, None]
                    elif X_PER_K:
                        part = part * x_step[:, None]
                    elif W_PER_K:
                        part = part * gate_w
                    gate = gate + part
                    part = warpgroup_mma(a, u_bufs.index(index).permute((1, 0)), part,
                                         use_acc=False, is_async=True)
                    part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
                    if W_SPLIT_N:  # a column's choice of two is fixed per register
                        hi = (offs_c >= W_SPLIT_N)[None, :]
                        if X_PER_K:
                            part = part * gl.where(hi, (x_step * up_w_hi)[:, None],
                                                   (x_step * up_w)[:, None])
                        else:
                            part = part * gl.where(hi, up_w_hi, up_w)
                    elif X_PER_K and W_PER_K:
                        part = part * (x_step * up_w)[:, None]
                    elif X_PER_K:
                        part = part * x_step[:, None]
                    elif W_PER_K:
                        part = part * up_w
                    up = up + part
                    mbarrier.arrive(empty.index(index), count=1)
                    counter += 1
            else:  # idle (a tail tile's second half)
                counter = release_steps(ready, empty, counter, H, BLOCK_K, NUM_BUFFERS)
            if busy:
                cols = pid_n * BLOCK_N + offs_c  # [BLOCK_N]
                # PARTIAL_N: the last column tile's columns from I on are not the layer's;
                # per-column loads read column I − 1 there (past the last expert's they
                # would leave its tensors; a mask spilled 4 bytes) and the values are
                # zeroed before the group's amax.
                col_in = gl.minimum(cols, I - 1) if PARTIAL_N else cols
                if not X_PER_K:
                    gate = gate * x_rows[:, None]
                    up = up * x_rows[:, None]
                if not W_PER_K:  # (per-K weight scales were applied per step)
                    if W_UNIFORM_N:  # one scale per expert, or per tile-covering group
                        gate = gate * gl.load(ws_base + (pid_n * BLOCK_N // W_GROUP_N)
                                              * stride_wsn)
                        up = up * gl.load(ws_base + ((I + pid_n * BLOCK_N) // W_GROUP_N)
                                          * stride_wsn)
                    else:
                        gate = gate * gl.load(ws_base + (col_in // W_GROUP_N)
                                              * stride_wsn)[None, :]
                        up = up * gl.load(ws_base + ((I + col_in) // W_GROUP_N)
                                          * stride_wsn)[None, :]
                if HAS_BIAS and not (X_PER_K and W_PER_K):
                    b_base = b13_ptr + expert.to(gl.int64) * stride_be
                    gate = gate + gl.load(b_base + col_in).to(gl.float32)[None, :]
                    up = up + gl.load(b_base + I + col_in).to(gl.float32)[None, :]
                act = _activate(gate, up, ACTIVATION, alpha, limit)
                if PARTIAL_N:
                    act = gl.where((cols < I)[None, :], act, 0.0)
                # × the correctly rounded reciprocal, not ÷ per value (IEEE division is a
                # dozen instructions): an fp8 value can differ only where x / scale lies
                # within an fp32 ulp of a rounding boundary.
                if INTER_STATIC:
                    inverse = gl.div_rn(1.0, gl.load(inter_scale_ptr))
                    q = act * inverse
                else:  # the tile's 128 columns are one 1×128 group of each row
                    scale = _scale_from_amax(gl.max(gl.abs(act), axis=1), FMAX, AMAX_FLOOR)
                    gl.store(inter_scale_ptr + slots.to(gl.int64) * stride_ism + pid_n, scale)
                    q = act * gl.div_rn(gl.full_like(scale, 1.0), scale)[:, None]
                q = gl.minimum(gl.maximum(q, -FMAX), FMAX)
                tma.store_wait(pendings=0)  # the previous tile's store has left q_smem
                q_smem.store(q.to(gl.float8e4nv))
                fence_async_shared()
                tma.async_copy_shared_to_global(
                    q_desc, [first_slot + CONSUMER * _HALF_M, pid_n * BLOCK_N], q_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _gemm1_ws_kernel(
        a_desc,  # hidden quantised, [capacity, H] in plan order, [128, BLOCK_K] boxes; with
        # GATHER_A over x, [M, H] (its box layout only)
        b_desc,  # w13 as [E·2I, H], [BLOCK_N, BLOCK_K] boxes
        q_desc,  # inter [capacity, I] fp8 in plan order, [64, BLOCK_N] boxes
        xs_desc,  # X_STAGED: hidden's scales transposed, [K groups, capacity], [1, BLOCK_M]
        # boxes (else any descriptor, unread)
        x_ptr,  # GATHER_A: hidden quantised per token, [M, H] (row stride stride_xm)
        xs_ptr,  # hidden's: xs[row · stride_xsm + (k // X_GROUP_K) · stride_xsk] (0: one),
        # row the slot (or, GATHER_A, its token)
        ws_ptr,  # w13's: ws[e · s_we + (n // W_GROUP_N) · s_wn + (k // W_GROUP_K) · s_wk]
        b13_ptr,  # [E, 2I] (read only when HAS_BIAS)
        inter_scale_ptr,  # out [capacity, ⌈I / 128⌉] fp32, or INTER_STATIC the scale read
        sorted_pairs_ptr,  # [capacity] int32: slot → pair (read only when GATHER_A)
        block_experts_ptr,  # [capacity / plan rows] int32
        work_ptr,  # TAIL_M: the work list, its length after it; else expert_offsets [E + 1]
        num_work,  # TAIL_M: the work list's length in entries; else E
        num_pairs, top_k, H, I, stride_xm, stride_xsm, stride_xsk, stride_wse, stride_wsn,
        stride_wsk, stride_be, stride_ism, alpha, limit,
        TAIL_M: gl.constexpr, GROUP_M: gl.constexpr, NUM_BUFFERS: gl.constexpr,
        GATHER_A: gl.constexpr, ACTIVATION: gl.constexpr,
        X_PER_K: gl.constexpr, X_GROUP_K: gl.constexpr, X_STAGED: gl.constexpr,
        W_PER_K: gl.constexpr, W_GROUP_N: gl.constexpr, W_GROUP_K: gl.constexpr,
        W_UNIFORM_N: gl.constexpr, W_SPLIT_N: gl.constexpr, HAS_BIAS: gl.constexpr,
        INTER_STATIC: gl.constexpr, PARTIAL_N: gl.constexpr, FMAX: gl.constexpr,
        AMAX_FLOOR: gl.constexpr, PREFETCH: gl.constexpr, CHUNK: gl.constexpr,
        REGS_FIRST: gl.constexpr, REGS_SECOND: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """Persistent over (row tile, 128 intermediate columns) in `tile_coords` order
        (GROUP_M row tiles per column tile, 1: row tile major); this program's own
        warpgroup is the producer, two more the math (as `_gemm2_ws_kernel`)."""
        gl.static_assert(num_warps == 4, "the producer is one warpgroup")
        # Scales per token along K would hold a second row index through the K loop
        # (12 bytes of spill in the math warpgroups): those keep the plan-order rows.
        gl.static_assert(not (GATHER_A and X_PER_K), "GATHER_A: scales constant along K")
        gl.static_assert(a_desc.block_type.shape[1] == q_desc.block_type.shape[1],
                         "K steps as wide as the column tile")
        dtype: gl.constexpr = a_desc.dtype
        gl.static_assert(dtype == gl.float8e4nv, "fp8 operands")
        a_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS] + a_desc.block_type.shape,
                                           a_desc.layout)
        g_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS] + b_desc.block_type.shape,
                                           b_desc.layout)
        u_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS] + b_desc.block_type.shape,
                                           b_desc.layout)
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape,
                                           q_desc.layout)
        xs_bufs = a_bufs  # (unread)
        if X_STAGED:
            gl.static_assert(X_PER_K and not GATHER_A, "staged scales: per K, plan rows")
            gl.static_assert(X_GROUP_K % a_desc.block_type.shape[1] == 0, "whole K steps a group")
            xs_bufs = gl.allocate_shared_memory(xs_desc.dtype,
                                                [NUM_BUFFERS] + xs_desc.block_type.shape,
                                                xs_desc.layout)
        # GATHER_A: each of the producer's 128 threads arrives when its copies land.
        ready, empty = stage_ring(NUM_BUFFERS, 129 if GATHER_A else 1)
        gl.warp_specialize(
            [(_producer, (a_desc, b_desc, xs_desc, x_ptr, stride_xm, sorted_pairs_ptr,
                          num_pairs, top_k, block_experts_ptr, work_ptr, num_work, H, I,
                          a_bufs, g_bufs, u_bufs, xs_bufs, ready, empty, TAIL_M, GROUP_M,
                          NUM_BUFFERS, GATHER_A, X_STAGED, X_GROUP_K, PREFETCH, CHUNK)),
             (_consumer, (q_desc, xs_ptr, ws_ptr, b13_ptr, inter_scale_ptr, sorted_pairs_ptr,
                          num_pairs, top_k, block_experts_ptr, work_ptr, num_work, H, I,
                          stride_xsm, stride_xsk, stride_wse, stride_wsn, stride_wsk, stride_be,
                          stride_ism, alpha, limit, a_bufs, g_bufs, u_bufs, xs_bufs, ready,
                          empty, q_bufs, 0, TAIL_M, GROUP_M, NUM_BUFFERS, GATHER_A, ACTIVATION,
                          X_PER_K, X_GROUP_K, X_STAGED, W_PER_K, W_GROUP_N, W_GROUP_K,
                          W_UNIFORM_N, W_SPLIT_N, HAS_BIAS, INTER_STATIC, PARTIAL_N, FMAX,
                          AMAX_FLOOR, CHUNK)),
             (_consumer, (q_desc, xs_ptr, ws_ptr, b13_ptr, inter_scale_ptr, sorted_pairs_ptr,
                          num_pairs, top_k, block_experts_ptr, work_ptr, num_work, H, I,
                          stride_xsm, stride_xsk, stride_wse, stride_wsn, stride_wsk, stride_be,
                          stride_ism, alpha, limit, a_bufs, g_bufs, u_bufs, xs_bufs, ready,
                          empty, q_bufs, 1, TAIL_M, GROUP_M, NUM_BUFFERS, GATHER_A, ACTIVATION,
                          X_PER_K, X_GROUP_K, X_STAGED, W_PER_K, W_GROUP_N, W_GROUP_K,
                          W_UNIFORM_N, W_SPLIT_N, HAS_BIAS, INTER_STATIC, PARTIAL_N, FMAX,
                          AMAX_FLOOR, CHUNK))],
            [4, 4], [REGS_FIRST, REGS_SECOND])


def gluon_gemm1(x: torch.Tensor, x_scale: torch.Tensor, x_strides: tuple[int, int],
                x_group_k: int | None, w13: torch.Tensor, w13_scale: torch.Tensor,
                w_layout: tuple[int, int, int, int, int], w_uniform_n: bool,
                b13: torch.Tensor | None, inter: torch.Tensor, inter_scale: torch.Tensor,
                inter_static: bool, plan, activation: str, alpha: float, limit: float,
                fmax: float, amax_floor: float, programs: int,
                gather_top_k: int | None = None, x_staged: bool = False) -> None:
    """fp8 GEMM1 over the plan's row tiles (`_gemm1_ws_kernel`), writing GEMM2's input.

    Args:
        x: [capacity, H] fp8, hidden's rows in plan order; or, with `gather_top_k` (the
            routing's k), [M, H], one row per token, gathered per slot by the kernel.
            x_scale: their scales, `x_strides` = (per row, per K group): (0, 0) one for
            all, (1, 0) one per row, (groups, 1) per 1×g group; `x_group_k` the K group of
            per-K scales (None: constant along K). `x_staged`: those per-K scales are
            [groups, capacity rounded up to 4], strides (1, capacity rounded), and travel
            through the stage (`stage_input_scales`).
        w13: [E, 2I, H] fp8, contiguous (gate rows, then up); w13_scale with `w_layout`
            (`weight_scale_layout`'s tuple); `w_uniform_n`: one scale covers each column
            tile (needed where the scale varies along K).
        b13: optional [E, 2I].
        inter: out [capacity, I] fp8; inter_scale: out [capacity, ⌈I / 128⌉] fp32 (row
            stride any), or with `inter_static` the static scale, read.
        plan: the `DispatchPlan` (128-row blocks, or 64 with the tail work list).
        programs: the persistent grid (one per SM; `_gluon.schedule` may launch one program
            per tile instead).
    """
    w_per_k = w_layout[2] != 0
    split_n = split_up_scales(w_layout, w_uniform_n, inter.shape[1])
    regs = worker_registers(split_n, b13 is not None)
    assert w_uniform_n or not w_per_k or split_n, "per-K weight scales: ≤ 2 per column tile"
    work, num_work, tail_m = work_list(plan)
    hidden = w13.shape[2]
    # a column tile's weights: its gate and up rows over all of H, one byte each
    grid, chunk = _gluon.schedule(programs, plan, cdiv(inter.shape[1], BLOCK_N), w13,
                                  2 * BLOCK_N * hidden)
    a_desc = descriptor(x, [BLOCK_M, BLOCK_K])
    launcher(_gemm1_ws_kernel)[grid](
        a_desc, descriptor(w13, [BLOCK_N, BLOCK_K]), descriptor(inter, [HALF_M, BLOCK_N]),
        descriptor(x_scale, [1, BLOCK_M]) if x_staged else a_desc,  # (unread unless staged)
        x, x_scale, w13_scale,
        plan.sorted_pairs if b13 is None else b13, inter_scale, plan.sorted_pairs,
        plan.block_experts, work, num_work, plan.num_pairs, gather_top_k or 1, hidden,
        inter.shape[1], x.stride(0), *x_strides, *w_layout[:3],
        0 if b13 is None else b13.stride(0), 0 if inter_static else inter_scale.stride(0),
        float(alpha), float(limit),
        TAIL_M=tail_m, GROUP_M=group_m(w13), NUM_BUFFERS=STAGES,
        GATHER_A=gather_top_k is not None, ACTIVATION=activation,
        X_PER_K=x_group_k is not None, X_GROUP_K=x_group_k or 1, X_STAGED=x_staged,
        W_PER_K=w_per_k, W_GROUP_N=w_layout[3], W_GROUP_K=w_layout[4],
        W_UNIFORM_N=w_uniform_n, W_SPLIT_N=split_n,
        HAS_BIAS=b13 is not None, INTER_STATIC=inter_static,
        PARTIAL_N=inter.shape[1] % BLOCK_N != 0, FMAX=fmax, AMAX_FLOOR=amax_floor,
        PREFETCH=_gluon.PREFETCH_TILES_FP8, CHUNK=chunk,
        REGS_FIRST=regs[0], REGS_SECOND=regs[1], num_warps=4,
    )
