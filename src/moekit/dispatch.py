"""Build the dispatch plan on the GPU: pairs grouped by expert, padded to the GEMM tile.

See `moekit.dispatch_plan` for the layout. The plan's shapes depend only on
(M*k, E, block_m), so building it never synchronises with the host and a CUDA graph
can capture it. Within an expert, pairs keep their order (stable), so the plan — and
every output computed through it — is deterministic.

Expert parallelism: with an `expert_map` (global id → local id, −1 = on another rank)
the kernels map each id before binning, so pairs of remote experts are dropped by the
plan itself, and every consumer of the plan (GEMMs, permute, unpermute) skips them
without looking at ids again. E is then the local expert count. Paths that read ids
themselves (the direct decode GEMMs, the combine) take them mapped by
`local_expert_ids` instead: one small launch, after which an id outside [0, E) means
"not here" everywhere.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekit import reference
from moekit._checks import check_tensor
from moekit._dispatch_kernels import (
    _count_pairs_kernel,
    _local_ids_kernel,
    _place_pairs_kernel,
    _scan_counts_kernel,
)
from moekit._intmath import cdiv, next_power_of_2
from moekit._launch import launcher
from moekit.backend import resolve_backend
from moekit.dispatch_plan import DispatchPlan, max_padded_pairs, max_tiles

_BLOCKS_PER_PROGRAM = 64
# Experts whose blocks one place program writes: 4, or more past 256 experts (at most
# 64 programs for the experts); fewer when there are more chunks than that.
_EXPERTS_PER_PROGRAM = 4
_EXPERT_PROGRAMS = 64
_LOCAL_IDS_BLOCK = 1024
_BLOCK_TILE = 16
# Pairs per place program: its rank count compares CHUNK × CHUNK pairs; 256 past
# _LARGE_PAIRS, where 128 makes the count and scan launches slower than the ranks gain
# (bench/results/h200-20261202-plan-rank-experiment.md).
_CHUNK = 128
_LARGE_CHUNK = 256
_LARGE_PAIRS = 65536
# Up to this many pairs one launch: every place program histograms all of them itself
# (a launch costs ~70 µs of host time on the lent H100 VM); beyond, count and scan
# launches first. Raised to the cell's pairs it measured slower everywhere on an H100:
# 8K pairs 14.9 against 11.7 µs, 16K 29–378 against 12–13 (bench/results/
# h100-sxm-20261206-plan-launches-s57.md): each program's histogram of every pair costs more
# than the two launches it saves.
_FUSED_PAIRS = 4096
# The scan kernel's bins per program and values per step.
_SCAN_BINS = 16
_SCAN_VALUES = 4096


def _chunk_size(num_pairs: int) -> int:
    """Pairs per place program: a power of two from 32 to _CHUNK (_LARGE_CHUNK past
    _LARGE_PAIRS)."""
    if num_pairs > _LARGE_PAIRS:
        return _LARGE_CHUNK
    return max(32, min(_CHUNK, next_power_of_2(num_pairs)))


def _int32_views(device: torch.device, sizes: list[int]) -> list[torch.Tensor]:
    """Carve int32 tensors of these sizes out of one allocation, each 64-byte aligned
    (one `split_with_sizes`, the pads between: half the host time of slicing each)."""
    parts = []
    for n in sizes:
        parts += [n, cdiv(n, 16) * 16 - n]
    buffer = torch.empty(sum(parts), dtype=torch.int32, device=device)
    return list(buffer.split_with_sizes(parts)[::2])


def dispatch_plan(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    *,
    expert_map: torch.Tensor | None = None,
    tile_m: int | None = None,
    backend: str = "auto",
) -> DispatchPlan:
    """Group the M*k token–expert pairs by expert, each run padded to `block_m` slots.

    Args:
        topk_ids: [M, k] int32 expert ids (any strides; a strided view is copied); ids
            outside [0, E) are dropped.
        num_experts: E (the local count when `expert_map` is given).
        block_m: the row tile of the GEMMs that consume the plan (a power of two ≥ 16).
        expert_map: optional int32 [E_global] on topk_ids' device: local id of each
            global expert, −1 (any value outside [0, E)) for experts of other ranks.
            `topk_ids` then holds global ids; ids outside [0, E_global) are dropped.
        tile_m: 2·block_m to also build the tail-tile work list `tiles` (layout in
            `moekit.dispatch_plan`), in the same launch; None for none.
        backend: "auto", "triton" or "reference" (see `moekit.backend`).
    Returns:
        A `DispatchPlan` on topk_ids' device, `pair_slots` filled (and `tiles` when asked).
    """
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32,))
    if num_experts <= 0:
        raise ValueError(f"num_experts: expected a positive count, got {num_experts}")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m: expected a power of two ≥ 16, got {block_m}")
    if tile_m is not None and tile_m != 2 * block_m:
        raise ValueError(f"tile_m: expected None or 2·block_m = {2 * block_m}, got {tile_m}")
    if expert_map is not None:
        expert_map = _checked_expert_map(expert_map, topk_ids)
    if resolve_backend(backend, topk_ids) == "reference":
        return reference.dispatch_plan(topk_ids, num_experts, block_m, expert_map=expert_map,
                                       tile_m=tile_m)

    plan, place = prepared_plan(topk_ids, num_experts, block_m, expert_map=expert_map,
                                tile_m=tile_m)
    launcher(_place_pairs_kernel)[(place.programs,)](*place.args, **place.constexprs)
    return plan


class PlaceLaunch(NamedTuple):
    """`_place_pairs_kernel`'s launch: its grid, arguments and constexprs."""

    programs: int
    args: tuple
    constexprs: dict


def prepared_plan(topk_ids: torch.Tensor, num_experts: int, block_m: int, *,
                  expert_map: torch.Tensor | None = None,
                  tile_m: int | None = None) -> tuple[DispatchPlan, PlaceLaunch]:
    """`dispatch_plan`'s buffers (unchecked arguments, Triton backend) and the launch that
    fills them, not yet made — the count and scan launches before it are, where there are
    many pairs. For a caller that runs the place kernel beside other work in one launch
    (`moekit._fp8_quantize.launch_plan_and_quantize`)."""
    if num_experts + 1 > 2**16:
        raise ValueError(f"num_experts: at most {2**16 - 1} experts, got {num_experts}")
    num_pairs = topk_ids.numel()
    capacity = max_padded_pairs(num_pairs, num_experts, block_m)
    num_blocks = capacity // block_m
    bins = next_power_of_2(num_experts + 1)
    chunk = _chunk_size(num_pairs)
    num_chunks = max(1, cdiv(num_pairs, chunk))
    scanned = num_pairs > _FUSED_PAIRS
    expert_programs = cdiv(num_experts, max(_EXPERTS_PER_PROGRAM,
                                            cdiv(num_experts, _EXPERT_PROGRAMS)))
    programs = max(num_chunks, expert_programs, cdiv(num_blocks, _BLOCKS_PER_PROGRAM))
    experts_per_program = next_power_of_2(cdiv(num_experts, programs))
    blocks_per_program = cdiv(num_blocks, programs) if num_blocks else 0
    tiles_len = max_tiles(num_blocks, num_experts, num_pairs) if tile_m else 0

    # One allocation for the plan and the kernels' scratch (each allocation costs host time).
    sorted_pairs, block_experts, expert_offsets, pair_slots, tiles, scratch, prefix, totals = (
        _int32_views(
            topk_ids.device,
            [capacity, num_blocks, num_experts + 1, num_pairs, tiles_len + 1 if tile_m else 0,
             programs * 4 * bins, num_chunks * bins if scanned else 0, bins if scanned else 0],
        )
    )
    plan = DispatchPlan(
        sorted_pairs, block_experts, expert_offsets, num_pairs, block_m, pair_slots,
        tiles if tile_m else None,
    )
    # The kernels read the ids as one dense run: `reshape` would return a strided view
    # where it can (a column slice `ids[:, :1]`, a row `ids[:1]` of a wider tensor).
    flat_ids = topk_ids.contiguous().view(-1)
    has_map = expert_map is not None
    id_map = expert_map if has_map else flat_ids  # placeholder pointer, never read
    num_global = expert_map.numel() if has_map else num_experts
    if scanned:
        launcher(_count_pairs_kernel)[(num_chunks,)](
            flat_ids, id_map, prefix, num_pairs, num_experts, num_global,
            CHUNK=chunk, BINS=bins, HAS_MAP=has_map,
        )
        scan_bins = min(bins, _SCAN_BINS)
        launcher(_scan_counts_kernel)[(bins // scan_bins,)](
            prefix, totals, num_chunks, BINS=bins, SCAN_BINS=scan_bins,
            ROWS=max(1, _SCAN_VALUES // scan_bins),
        )
    else:
        prefix = totals = scratch  # not read
    return plan, PlaceLaunch(
        programs,
        (flat_ids, id_map, prefix, totals, scratch, sorted_pairs, block_experts,
         expert_offsets, pair_slots, tiles, num_pairs, num_experts, num_global, num_chunks,
         num_blocks, blocks_per_program, tiles_len),
        dict(CHUNK=chunk, ALL_PAIRS=1 if scanned else next_power_of_2(max(num_pairs, 1)),
             BINS=bins, EXPERTS_PER_PROGRAM=experts_per_program, BLOCK_M=block_m,
             TILE_M=tile_m or 0, BLOCK_TILE=_BLOCK_TILE, SCANNED=scanned, HAS_MAP=has_map),
    )


def local_expert_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor, num_experts: int, *,
                     backend: str = "auto") -> torch.Tensor:
    """Global expert ids → this rank's local ids, for expert parallelism.

    Args:
        topk_ids: [M, k] int32 global expert ids.
        expert_map: int32 [E_global] on topk_ids' device: each global expert's local id,
            −1 (any value outside [0, num_experts)) for experts held by other ranks.
        num_experts: E, the local expert count.
        backend: "auto", "triton" or "reference" (see `moekit.backend`).
    Returns:
        int32 [M, k]: the local id of each pair, −1 where its expert is elsewhere or its
        global id is outside [0, E_global) — the ids every fast path then skips.
    """
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32,))
    if num_experts <= 0:
        raise ValueError(f"num_experts: expected a positive count, got {num_experts}")
    expert_map = _checked_expert_map(expert_map, topk_ids)
    if resolve_backend(backend, topk_ids) == "reference":
        return reference.local_expert_ids(topk_ids, expert_map, num_experts)
    ids = topk_ids.contiguous()
    out = torch.empty_like(ids)
    if ids.numel():
        launcher(_local_ids_kernel)[(cdiv(ids.numel(), _LOCAL_IDS_BLOCK),)](
            ids, expert_map, out, ids.numel(), expert_map.numel(), num_experts,
            BLOCK=_LOCAL_IDS_BLOCK,
        )
    return out


def _checked_expert_map(expert_map: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """An expert map validated against the ids it will translate; contiguous."""
    check_tensor("expert_map", expert_map, ndim=1, dtypes=(torch.int32,),
                 device=topk_ids.device)
    if expert_map.numel() == 0:
        raise ValueError("expert_map: expected one entry per global expert, got none")
    return expert_map.contiguous()
