"""Reference dispatch plan: token–expert pairs grouped by expert, padded to blocks."""

from __future__ import annotations

import torch

from moekit.dispatch_plan import DispatchPlan, max_padded_pairs, max_tiles


def dispatch_plan(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    *,
    expert_map: torch.Tensor | None = None,
    tile_m: int | None = None,
) -> DispatchPlan:
    """Group the flattened pairs (index m*k + j) by expert, in pair order within an expert.

    Each expert's run is padded with the sentinel M*k to a multiple of `block_m`; ids
    outside [0, E) are dropped. Slots past the last expert's run hold the sentinel, and
    blocks there hold expert −1, so the shapes depend only on (M*k, E, block_m).
    `pair_slots` inverts `sorted_pairs`: the slot of each pair, −1 for dropped pairs.

    Args:
        topk_ids: [M, k] integer expert ids (global ids when `expert_map` is given).
        num_experts: E, the local expert count.
        block_m: run padding (the GEMM row tile).
        expert_map: optional integer [E_global]: local id of each global expert, values
            outside [0, E) for experts held elsewhere; ids outside [0, E_global) drop.
        tile_m: 2·block_m for the tail-tile work list `tiles` (`moekit.dispatch_plan`).
    """
    flat = topk_ids.reshape(-1).long().cpu()
    if expert_map is not None:
        flat = local_expert_ids(flat, expert_map, num_experts).long()
    num_pairs = flat.numel()
    capacity = max_padded_pairs(num_pairs, num_experts, block_m)
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int32)
    block_experts = torch.full((capacity // block_m,), -1, dtype=torch.int32)
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int32)
    pos = 0
    for e in range(num_experts):
        pairs = torch.nonzero(flat == e).flatten()
        n = pairs.numel()
        padded = -(-n // block_m) * block_m
        sorted_pairs[pos : pos + n] = pairs.to(torch.int32)
        block_experts[pos // block_m : (pos + padded) // block_m] = e
        pos += padded
        expert_offsets[e + 1] = pos
    pair_slots = torch.full((num_pairs,), -1, dtype=torch.int32)
    real = sorted_pairs < num_pairs
    pair_slots[sorted_pairs[real].long()] = torch.nonzero(real).flatten().to(torch.int32)
    tiles = None
    if tile_m:
        size = max_tiles(capacity // block_m, num_experts, num_pairs)
        tiles = _tile_list(expert_offsets.tolist(), block_m, size).to(topk_ids.device)
    device = topk_ids.device
    return DispatchPlan(
        sorted_pairs=sorted_pairs.to(device),
        block_experts=block_experts.to(device),
        expert_offsets=expert_offsets.to(device),
        num_pairs=num_pairs,
        block_m=block_m,
        pair_slots=pair_slots.to(device),
        tiles=tiles,
    )


def _tile_list(expert_offsets: list[int], plan_m: int, size: int) -> torch.Tensor:
    """The tail-tile work list of runs padded to plan_m (layout in `moekit.dispatch_plan`)."""
    tile_m = 2 * plan_m
    entries = []
    for start, end in zip(expert_offsets[:-1], expert_offsets[1:], strict=False):
        for first in range(start, end, tile_m):
            entries.append(first // plan_m * 2 + int(first + tile_m > end))
    listed = torch.full((size + 1,), -1, dtype=torch.int32)
    listed[: len(entries)] = torch.tensor(entries, dtype=torch.int32)
    listed[size] = len(entries)
    return listed


def local_expert_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor,
                     num_experts: int) -> torch.Tensor:
    """Global expert ids → this rank's local ids through `expert_map` (int32, topk_ids'
    shape and device): −1 where the global id is outside [0, E_global) or maps outside
    [0, num_experts) (an expert held elsewhere)."""
    ids = topk_ids.long()
    table = expert_map.long().to(ids.device)
    known = (ids >= 0) & (ids < table.numel())
    local = torch.where(known, table[ids.clamp(0, table.numel() - 1)], -1)
    return torch.where((local >= 0) & (local < num_experts), local, -1).to(torch.int32)
