"""One launch for the dispatch plan's place kernel and the fp8 row quantiser.

    programs [0, plan_programs)   `_place_pairs_kernel`'s (the plan: `moekit.dispatch`),
                                  called as a function: its program ids are the same
    the rest, (row, chunk)        `_quantize_rows` (hidden → fp8 rows and their scales)

The fp8 plan path runs both right before GEMM1, which needs both; neither reads what
the other writes (the quantiser here never scatters to plan slots), so their programs
share one grid: one launch's ramp and gap fewer (`moekit._fp8_quantize`).
"""

import triton
import triton.language as tl

from moekit._dispatch_kernels import _place_pairs_kernel
from moekit._experts_fp8_kernels import _quantize_rows


@triton.jit
def _plan_quantize_kernel(
    topk_ids_ptr,  # [M*k] int32
    expert_map_ptr,  # [E_global] int32 global → local id (read only when HAS_MAP)
    prefix_ptr,  # [chunks, BINS] int32: pairs per bin before each chunk (when SCANNED)
    totals_ptr,  # [BINS] int32: pairs per bin (when SCANNED)
    scratch_ptr,  # [programs, 4, BINS] int32: per-bin values each program gathers from
    sorted_pairs_ptr,  # [capacity] int32, out
    block_experts_ptr,  # [capacity / BLOCK_M] int32, out
    expert_offsets_ptr,  # [E + 1] int32, out
    pair_slots_ptr,  # [M*k] int32, out: slot of each pair, −1 when dropped
    tiles_ptr,  # [max_tiles + 1] int32, out: the work list, then its length (when TILE_M)
    num_pairs,
    num_experts,
    num_global,
    num_chunks,
    num_blocks,
    blocks_per_program,
    max_tiles,
    x_ptr,  # [M, K] bf16/fp16/fp32
    q_ptr,  # [M, K] fp8, out
    scale_ptr,  # static: [1] read; tensor(_rows): [1] out; token: [M] out; group: [M, nG] out
    partials_ptr,  # [num_partials] fp32 ("tensor" only)
    num_partials,
    num_rows,  # M ("tensor_rows" only)
    K,
    chunk,  # values of a row per program along grid axis 1: a multiple of BLOCK_K, or ≥ K
    stride_xm,
    stride_qm,
    stride_sm,
    stride_sk,  # "group": between a row's group scales
    slots_ptr,  # SCATTER: int32 [M·top_k] plan slot of each pair (−1: dropped)
    top_k,
    clear_ptr,  # CLEAR: int32 [clear_n], zeroed by program (0, 0) for a later kernel
    clear_n,
    plan_programs,  # the place kernel's grid; the quantiser's programs follow
    quant_chunks,  # the quantiser's programs per row
    CHUNK: tl.constexpr,  # pairs per chunk, a power of two ≥ 32
    ALL_PAIRS: tl.constexpr,  # unless SCANNED: a power of two ≥ num_pairs
    BINS: tl.constexpr,
    EXPERTS_PER_PROGRAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_M: tl.constexpr,  # 0, or 2·BLOCK_M: write the tail-tile work list
    BLOCK_TILE: tl.constexpr,
    SCANNED: tl.constexpr,  # the totals and prefixes come from `_scan_counts_kernel`
    HAS_MAP: tl.constexpr,
    MODE: tl.constexpr,  # "static", "tensor", "tensor_rows", "token" or "group"
    SCATTER: tl.constexpr,  # write row m (and its scales) to its pairs' plan slots
    CLEAR: tl.constexpr,
    GROUP: tl.constexpr,  # the K group of "group"
    FMAX: tl.constexpr,
    AMAX_FLOOR: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of GROUP
    BLOCK_P: tl.constexpr,  # ≥ num_partials
    AMAX_ROWS: tl.constexpr,  # "tensor_rows": rows per step of the amax
    AMAX_WHOLE: tl.constexpr,  # "tensor_rows": one [AMAX_ROWS, BLOCK_K] load covers every row
):
    """Grid (plan_programs + rows × quant_chunks,)."""
    pid = tl.program_id(0)
    if pid < plan_programs:
        _place_pairs_kernel(topk_ids_ptr, expert_map_ptr, prefix_ptr, totals_ptr, scratch_ptr,
                            sorted_pairs_ptr, block_experts_ptr, expert_offsets_ptr,
                            pair_slots_ptr, tiles_ptr, num_pairs, num_experts, num_global,
                            num_chunks, num_blocks, blocks_per_program, max_tiles, CHUNK,
                            ALL_PAIRS, BINS, EXPERTS_PER_PROGRAM, BLOCK_M, TILE_M, BLOCK_TILE,
                            SCANNED, HAS_MAP)
    else:
        quant = pid - plan_programs
        _quantize_rows(quant // quant_chunks, quant % quant_chunks, x_ptr, q_ptr,
                       scale_ptr, partials_ptr, num_partials, num_rows, K, chunk,
                       stride_xm, stride_qm, stride_sm, stride_sk, slots_ptr, top_k,
                       clear_ptr, clear_n, MODE, SCATTER, CLEAR, GROUP, FMAX, AMAX_FLOOR, BLOCK_K,
                       BLOCK_P, AMAX_ROWS, AMAX_WHOLE)
