"""Which fp8 GEMMs compute their few-row tiles swapped, `W · xᵀ` instead of `x · Wᵀ`.

Hopper's fp8 MMA (`wgmma … e4m3`) takes 64 rows on its A side. A dot whose A tile has
16 or 32 rows (the decode tiles) is compiled by Triton 3.6 as `mma.sync.m16n8k16.f16`
on operands converted from fp8 to fp16 first, and each of the tile's warps converts the
whole activation tile again: about two conversions per weight byte, which bounds the
weight stream at 74–78% of a plain read for the direct GEMM1's 32-column tile (H200,
`bench/scripts/swap_ab_experiment.py`, bench/NOTES.md session 43). Swapped — the weight
tile's rows as the MMA's 64-row side, the token rows as its N — the same tile is one
native fp8 wgmma with no conversion, and streams at 98–100% of the read.

The GEMMs (names as in `MOEKIT_FP8_SWAP_AB`):
    direct1  the direct GEMM1: a tile's gate and up rows stacked into one 64-row operand
    direct2  the direct GEMM2 (the slots of a part as the 16 token rows)
    plan1    the plan path's GEMM1 at row tiles under 64 rows
    plan2    the plan path's GEMM2 at row tiles under 64 rows

`MOEKIT_FP8_SWAP_AB` (for measurement): "1" every one, "0" none, or a comma-separated
list of names; read once, at import.

A swapped K step runs on wgmma's own pipeline, which holds all `num_stages` tiles in
shared memory where the converted path keeps one of them in registers: at the same
stages the direct GEMM1 fits 2 programs an SM instead of 3 (sm_90 compile). So a swapped
GEMM runs one stage fewer (`swapped_stages`), the shared memory of the unswapped one
(`MOEKIT_FP8_SWAP_STAGES=same` keeps them, for measurement).

wgmma adds an fp8 tile's products into its accumulator at reduced precision (about 14
bits kept, DeepSeek-V3 §3.3.2); the converted path's fp16 MMAs add in fp32. So a swapped
dot promotes its sum into fp32 every `PROMOTE_K` products (`max_num_imprecise_acc`;
`MOEKIT_FP8_SWAP_PROMOTE_K`, for measurement; 0 = never).
"""

from __future__ import annotations

import os

GEMMS = ("direct1", "direct2", "plan1", "plan2")
# The MMA's row side: a tile with at least this many rows is a native wgmma already.
WGMMA_ROWS = 64


def _parse(value: str) -> frozenset[str]:
    value = value.strip()
    if value in ("", "1"):
        return frozenset(GEMMS)
    if value == "0":
        return frozenset()
    names = frozenset(name.strip() for name in value.split(",") if name.strip())
    unknown = names - set(GEMMS)
    if unknown:
        raise ValueError(f"MOEKIT_FP8_SWAP_AB: unknown GEMM(s) {sorted(unknown)}; "
                         f"expected '0', '1' or names from {GEMMS}")
    return names


SWAPPED = _parse(os.environ.get("MOEKIT_FP8_SWAP_AB", "1"))
# "rule" (`swapped_stages`), "fewer" (always one fewer) or "same"; for measurement.
_STAGES = os.environ.get("MOEKIT_FP8_SWAP_STAGES", "rule")
# K loops at least this long keep their stages (`swapped_stages`).
LONG_K_STEPS = 32
# Swapped pipelines shallower than this keep their stages.
MIN_FEWER_STAGES = 3
PROMOTE_K = int(os.environ.get("MOEKIT_FP8_SWAP_PROMOTE_K", "32"))


def swap_ab(gemm: str, rows: int, weight_rows: int) -> bool:
    """Whether `gemm` computes a tile of `rows` token rows × `weight_rows` weight rows
    swapped: it is switched on, the token rows are fewer than the MMA's row side, and the
    weight rows fill it."""
    return gemm in SWAPPED and rows < WGMMA_ROWS <= weight_rows


def swapped_stages(stages: int, k_steps: int) -> int:
    """A swapped GEMM's pipeline depth for a K loop of `k_steps` tiles: one stage fewer
    (see the module doc), except for long K loops and where that would leave fewer than
    MIN_FEWER_STAGES."""
    if _STAGES == "same":
        return stages
    if _STAGES == "fewer":
        return max(2, stages - 1)
    if k_steps >= LONG_K_STEPS or stages - 1 < MIN_FEWER_STAGES:
        return stages
    return stages - 1
