"""The search space of the experts GEMMs' tiles, and the hook that narrows it.

Candidates are grouped by the plan's row tile `block_m`; each is a `GemmConfig` that
either GEMM may use. A constraint — any `GemmConfig -> bool` — removes candidates
(tests use it to keep sweeps tiny; a user can use it to respect a register budget).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from moekit.tuning.config import DIRECT_BLOCK_M, GemmConfig

Constraint = Callable[[GemmConfig], bool]

# (block_n, block_k, num_warps, num_stages); group_m is 8 throughout (see heuristic.py),
# except the direct path's GEMM2 (`gemm2_candidates`).
_SHAPES = {
    DIRECT_BLOCK_M: [(32, 128, 4, 5), (16, 256, 4, 5), (32, 256, 4, 4), (64, 128, 4, 4),
                     (64, 128, 4, 6), (16, 128, 4, 8)],
    16: [(32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 4, 3), (64, 256, 4, 3),
         (32, 256, 4, 3), (128, 128, 4, 3)],
    32: [(32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 4, 3), (64, 256, 4, 3),
         (128, 128, 4, 3)],
    64: [(64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 4), (64, 128, 4, 3), (128, 128, 8, 3),
         (256, 64, 8, 3)],
    128: [(64, 64, 8, 4), (128, 64, 8, 4), (128, 128, 8, 3), (256, 64, 8, 3), (64, 128, 8, 3),
          (128, 64, 4, 4), (128, 64, 8, 3), (128, 32, 8, 5), (256, 32, 8, 4), (64, 64, 4, 5)],
}

BLOCK_MS = tuple(_SHAPES)


def candidates(block_m: int, constraint: Constraint | None = None) -> list[GemmConfig]:
    """Tile candidates for one GEMM at this row tile, after the constraint."""
    configs = [GemmConfig(n, k, 8, w, s) for n, k, w, s in _SHAPES[block_m]]
    return [c for c in configs if constraint is None or constraint(c)]


# The direct path's GEMM2 `group_m`: how many of a token's slots one program sums.
_DIRECT_SLOTS_PER_PROGRAM = (8, 2, 1)


def gemm2_candidates(block_m: int, constraint: Constraint | None = None) -> list[GemmConfig]:
    """`candidates` for GEMM2; on the direct path each tile also with a token's slots split
    over programs (`direct_slots_per_program`)."""
    tiles = candidates(block_m, constraint)
    if block_m != DIRECT_BLOCK_M:
        return tiles
    split = [dataclasses.replace(c, group_m=per) for c in tiles
             for per in _DIRECT_SLOTS_PER_PROGRAM]
    return [c for c in split if constraint is None or constraint(c)]


def neighbour_block_ms(block_m: int, direct: bool = True) -> list[int]:
    """The heuristic's row tile first, then half and double it where they exist; the
    direct path and the 16-row tile are each other's neighbours (`direct`: whether the
    kernel family has a direct path)."""
    if block_m == DIRECT_BLOCK_M:
        return [DIRECT_BLOCK_M, 16]
    near = [b for b in (block_m // 2, block_m * 2) if b in _SHAPES]
    if block_m == 16 and direct:
        near.insert(0, DIRECT_BLOCK_M)
    return [block_m] + near
