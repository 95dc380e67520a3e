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

import torch

from moekit import reference
from moekit._checks import check_tensor
from moekit._dispatch_kernels import _count_pairs_kernel, _local_ids_kernel, _place_pairs_kernel
from moekit._intmath import cdiv, next_power_of_2
from moekit.backend import resolve_backend
from moekit.dispatch_plan import DispatchPlan, max_padded_pairs, max_tiles

_BLOCKS_PER_PROGRAM = 64
# Histogram values each place program sums per step of its scan over all chunks (8 rows
# of 256 bins) rather than one row per step: the plan 8–11% faster on qwen3 at 128K pairs
# and on mixtral, within noise on qwen3 at 8K–32K pairs and on deepseek-v3
# (bench/results/h200-20261202-plan-scan-experiment.md).
_SCAN_VALUES = 2048
_LOCAL_IDS_BLOCK = 1024
_BLOCK_TILE = 16
# Up to this many pairs one program sorts them all and the count launch is skipped (a
# launch costs ~70 µs of host time on the lent H100 VM). Measured there: ~6 µs of GPU time
# at 1024 pairs, ~100 µs at 4096 (serial work in one program), so the cut is at 1024.
_SINGLE_CHUNK_PAIRS = 1024


def _chunk_size(num_pairs: int) -> int:
    """Pairs per program: one chunk (one launch) up to 1024 pairs, ~64 chunks beyond.

    Sort keys are expert * chunk + position: with E < 2^16 and chunk ≤ 4096 they stay
    below 2^28, inside int32.
    """
    if num_pairs <= _SINGLE_CHUNK_PAIRS:
        return max(16, next_power_of_2(num_pairs))
    return max(256, min(next_power_of_2(cdiv(num_pairs, 64)), 4096))


def _int32_views(device: torch.device, sizes: list[int]) -> list[torch.Tensor]:
    """Carve int32 tensors of these sizes out of one allocation, each 64-byte aligned."""
    starts, total = [], 0
    for n in sizes:
        starts.append(total)
        total += cdiv(n, 16) * 16
    buffer = torch.empty(total, dtype=torch.int32, device=device)
    return [buffer[a : a + n] for a, n in zip(starts, sizes, strict=True)]


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
        topk_ids: [M, k] int32 expert ids; ids outside [0, E) are dropped.
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

    if num_experts + 1 > 2**16:
        raise ValueError(f"num_experts: at most {2**16 - 1} experts, got {num_experts}")
    num_pairs = topk_ids.numel()
    capacity = max_padded_pairs(num_pairs, num_experts, block_m)
    num_blocks = capacity // block_m
    bins = next_power_of_2(num_experts + 1)
    chunk = _chunk_size(num_pairs)
    num_chunks = max(1, cdiv(num_pairs, chunk))
    single = num_chunks == 1
    programs = max(num_chunks, cdiv(num_blocks, _BLOCKS_PER_PROGRAM), 1)
    blocks_per_program = cdiv(num_blocks, programs) if num_blocks else 0
    tiles_len = max_tiles(num_blocks, num_experts, num_pairs) if tile_m else 0

    # One allocation for the plan and the kernels' scratch (each allocation costs host time).
    sorted_pairs, block_experts, expert_offsets, pair_slots, tiles, bases, counts = (
        _int32_views(
            topk_ids.device,
            [capacity, num_blocks, num_experts + 1, num_pairs, tiles_len + 1 if tile_m else 0,
             num_chunks * bins, 0 if single else num_chunks * bins],
        )
    )
    plan = DispatchPlan(
        sorted_pairs, block_experts, expert_offsets, num_pairs, block_m, pair_slots,
        tiles if tile_m else None,
    )
    flat_ids = topk_ids.reshape(-1)
    has_map = expert_map is not None
    id_map = expert_map if has_map else flat_ids  # placeholder pointer, never read
    num_global = expert_map.numel() if has_map else num_experts
    if single:
        counts = bases  # not read when SINGLE_CHUNK
    else:
        _count_pairs_kernel[(num_chunks,)](
            flat_ids, id_map, counts, num_pairs, num_experts, num_global,
            CHUNK=chunk, BINS=bins, HAS_MAP=has_map,
        )
    _place_pairs_kernel[(programs,)](
        flat_ids, id_map, counts, bases, sorted_pairs, block_experts, expert_offsets,
        pair_slots, tiles, num_pairs, num_experts, num_global, num_chunks, num_blocks,
        blocks_per_program, tiles_len, CHUNK=chunk, BINS=bins, BLOCK_M=block_m,
        TILE_M=tile_m or 0, BLOCK_TILE=_BLOCK_TILE, SINGLE_CHUNK=single, HAS_MAP=has_map,
        SCAN_ROWS=max(1, _SCAN_VALUES // bins),
    )
    return plan


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
        _local_ids_kernel[(cdiv(ids.numel(), _LOCAL_IDS_BLOCK),)](
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
