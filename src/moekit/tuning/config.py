"""Tile configurations of the experts GEMMs, as frozen values."""

from __future__ import annotations

from dataclasses import dataclass


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
    """Both GEMMs of the experts pipeline; they share the row tile `block_m` of the plan."""

    block_m: int
    gemm1: GemmConfig
    gemm2: GemmConfig

    def __post_init__(self) -> None:
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"block_m: expected a power of two ≥ 16, got {self.block_m}")
