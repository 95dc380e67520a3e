"""The one description of "which rows go to which expert", shared by every stage.

Pairs are the flattened (token, slot) entries of the top-k ids: pair p = m*k + j. The
plan lays them out grouped by expert, each expert's run padded to a multiple of
`block_m` (the GEMM's row tile), so one GEMM program serves exactly one expert:

    sorted_pairs   int32 [capacity]          pair index per slot; the sentinel M*k in padding
    block_experts  int32 [capacity/block_m]  expert of each block; −1 past the last run
    expert_offsets int32 [E + 1]             start slot of each expert's run; [E] = slots used
    pair_slots     int32 [M*k]               the inverse map: slot of each pair; −1 if dropped
    tiles          int32 [max_tiles + 1]     with tail tiles only: the GEMMs' work list, then
                                             its length (below)

With tail tiles (`tile_m` = 2·block_m) the GEMMs take tile_m-row tiles over a plan
padded to block_m: each expert's run becomes ⌈run / tile_m⌉ tiles, in expert order,
entry t = (first plan block · 2 + is_tail), is_tail marking the run's odd last block,
which the GEMMs compute block_m rows high; −1 past the last tile.

`capacity` depends only on (M*k, E, block_m), never on the routing, so the plan is
built on the GPU without a host synchronisation and its shapes are CUDA-graph safe.
The same layout is the "contiguous grouped" layout of permute/unpermute: permute
reads `sorted_pairs` (slot → pair), unpermute reads `pair_slots` (pair → slot), so the
combine gathers in a fixed order without atomics. A pair is dropped when its id is
outside [0, E) — or, with an `expert_map` (expert parallelism), when its global id maps
to no local expert — and then has no slot at all.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekit._intmath import cdiv


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Slots needed in the worst case: every non-empty expert adds < block_m of padding."""
    worst = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return cdiv(worst, block_m) * block_m


def max_tiles(num_blocks: int, num_experts: int, num_pairs: int) -> int:
    """Length of the tail-tile work list over a plan of `num_blocks` blocks: a run of b
    plan blocks takes ⌈b / 2⌉ tiles, so at most (blocks + non-empty runs) / 2 in all."""
    return min(num_blocks, (num_blocks + min(num_experts, num_pairs) + 1) // 2)


class DispatchPlan(NamedTuple):
    """Pairs grouped by expert and padded to `block_m` (see the module docstring)."""

    sorted_pairs: torch.Tensor
    block_experts: torch.Tensor
    expert_offsets: torch.Tensor
    num_pairs: int
    block_m: int
    # Last, with defaults, so plans built by hand before they existed stay valid; the
    # plan builders always fill pair_slots, and tiles when asked for tail tiles.
    pair_slots: torch.Tensor | None = None
    tiles: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        """Length of `sorted_pairs`: the slots reserved for the worst-case routing."""
        return self.sorted_pairs.numel()

    def row_tiles(self) -> tuple[int, int, int]:
        """(row tiles of a GEMM grid, their rows, TAIL_M): the plan's blocks, or with tail
        tiles (`tiles` built) the work list's entries, each two plan blocks high."""
        if self.tiles is None:
            return self.capacity // self.block_m, self.block_m, 0
        return self.tiles.numel() - 1, 2 * self.block_m, self.block_m
