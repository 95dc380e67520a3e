"""Tile configurations of the experts GEMMs, as frozen values."""

from __future__ import annotations

from dataclasses import dataclass

# `ExpertsConfig.block_m` of the direct path: one pair (GEMM1) or one token's slots, or
# part of them (GEMM2), per program, ids read straight from topk_ids, no plan and no
# separate combine (`moekit.experts_direct`).
DIRECT_BLOCK_M = 1


@dataclass(frozen=True)
class GemmConfig:
    """Column tile, reduction tile and launch shape of one grouped GEMM."""

    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}: expected a power of two ≥ 16, got {value}")


@dataclass(frozen=True)
class ExpertsConfig:
    """Both GEMMs of the experts pipeline; they share the row tile `block_m` of the plan.

    `tail_block_m` = block_m / 2 (tail tiles) pads the plan's runs to that many rows
    instead: each GEMM program takes two plan blocks of one expert as a block_m-row tile,
    or a run's odd last block as a tail_block_m-row tile (same column tiles), from a work
    list the plan's place kernel writes (`DispatchPlan.tiles`). Half the padding per
    expert; 0 turns it off.

    `block_m` = `DIRECT_BLOCK_M` (1) selects the direct path for a handful of tokens:
    no plan, GEMM tiles of one activation row. GEMM1's `group_m` is then unused; GEMM2's
    is how many of a token's k slots one program sums (k or more: one program per token;
    fewer: the parts' float32 sums are added by the token's last program).
    """

    block_m: int
    gemm1: GemmConfig
    gemm2: GemmConfig
    tail_block_m: int = 0

    def __post_init__(self) -> None:
        if self.block_m != DIRECT_BLOCK_M and (self.block_m < 16
                                               or self.block_m & (self.block_m - 1)):
            raise ValueError(
                f"block_m: expected a power of two ≥ 16, or {DIRECT_BLOCK_M} (the direct "
                f"path), got {self.block_m}"
            )
        if self.tail_block_m not in (0, self.block_m // 2) or 0 < self.tail_block_m < 16:
            raise ValueError(
                f"tail_block_m: expected 0 or block_m / 2 = {self.block_m // 2} (≥ 16), "
                f"got {self.tail_block_m}"
            )

    @property
    def direct(self) -> bool:
        """Whether this configuration runs the direct (plan-free) path."""
        return self.block_m == DIRECT_BLOCK_M

    def as_ints(self) -> list[int]:
        """The flat form the experts custom ops take (a list of ints is a schema type;
        a dataclass is not): block_m, GEMM1's five fields, GEMM2's five, tail_block_m."""
        g1, g2 = self.gemm1, self.gemm2
        return [
            self.block_m,
            g1.block_n, g1.block_k, g1.group_m, g1.num_warps, g1.num_stages,
            g2.block_n, g2.block_k, g2.group_m, g2.num_warps, g2.num_stages,
            self.tail_block_m,
        ]
