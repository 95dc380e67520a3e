"""Which fp8 GEMMs compute their few-row tiles swapped, `W · xᵀ` instead of `x · Wᵀ`.

Hopper's fp8 MMA (`wgmma … e4m3`) takes 64 rows on its A side. A dot whose A tile has
16 or 32 rows (the decode tiles) is compiled by Triton 3.6 as `mma.sync.m16n8k16.f16`
on operands converted from fp8 to fp16 first, and each of the tile's warps converts the
whole activation tile again: about two conversions per weight byte, which bounds the
weight stream at 74–78% of a plain read for the direct GEMM1's 32-column tile (H200,
`bench/scripts/swap_ab_experiment.py`, bench/NOTES.md session 43). Swapped — the weight
tile's rows as the MMA's 64-row side, the token rows as its N — the same tile is one
native fp8 wgmma with no conversion, and streams at 98–100% of the read. On the layer
(H100, session 44, `bench/results/h100-sxm-20261205-ab-fp8_*-swap-*-s44.md`): per-tensor
0.990–1.065× (median 1.018, M = 1–64 on five presets), per-channel 1.001–1.049×.

The GEMMs (names as in `MOEKIT_FP8_SWAP_AB`):
    direct1  the direct GEMM1: a tile's gate and up rows stacked into one 64-row operand
    direct2  the direct GEMM2 (the slots of a part as the 16 token rows)
    plan1    the plan path's GEMM1 at row tiles under 64 rows
    plan2    the plan path's GEMM2 at row tiles under 64 rows
Block-scaled weights (scales that vary along K) swap only in the plan GEMMs at 16-row
tiles (`BLOCK_SCALED_ROWS`): there 0.993–1.039× (qwen3, olmoe, mixtral, deepseek-v3),
where the direct GEMMs swapped ran 0.957–0.981× at M = 1 on qwen3 and olmoe (1.03–1.05×
at M = 4) and the 32-row plan tiles 0.968× on mixtral M = 64 (H100, session 44,
`h100-sxm-20261205-ab-fp8_block-swap-paths-s44.md`). The name `block` in the switch
swaps them wherever the others swap, for measurement.

`MOEKIT_FP8_SWAP_AB` (for measurement): "1" the four GEMMs, "0" none, or a
comma-separated list of names; read once, at import.

A swapped K step runs on wgmma's own pipeline, which holds all `num_stages` tiles in
shared memory where the converted path keeps one of them in registers: at the same
stages the direct GEMM1 fits 2 programs an SM instead of 3 (sm_90 compile), and qwen3,
olmoe and gpt-oss at M = 4 ran 0.98× main instead of 1.02–1.06×. So a swapped GEMM runs
one stage fewer (`swapped_stages`) — but for long K loops (mixtral: 0.97× at M = 1 with
one fewer, 1.01× with the same) and pipelines that would drop under 3 stages (granite's
narrow tiles at M = 16: 0.99× against 1.02×). `MOEKIT_FP8_SWAP_STAGES` = "fewer" or
"same" overrides the rule, for measurement.

wgmma adds an fp8 tile's products into its accumulator at reduced precision (about 14
bits kept, DeepSeek-V3 §3.3.2); the converted path's fp16 MMAs add in fp32. So a swapped
dot promotes its sum into fp32 every `PROMOTE_K` products (`max_num_imprecise_acc`):
every 128, once per 128-deep K tile, as DeepSeek-V3 does and as the prefill tiles'
wgmmas already add. Every 32 (shipped until session 65) serialised the dot: ptxas waited
on each of a K tile's four wgmmas and added it in fp32 before issuing the next (C7514),
and 128 ran 1.000–1.044× of 32 at decode (median 1.012–1.014 per scheme, M = 1–64 on
four presets; every 64: medians 1.002–1.004, its 16-row plan GEMM1 still serialised) for
a layer error of 1.6–5.2e-3 against 32's 1.6–4.0e-3 (H100, session 65,
`bench/results/h100-sxm-20261207-ab-fp8_*-promote-s65.md`); never promoting measured
3.7–6.1e-3 for 1–2% more speed in session 44 (`MOEKIT_FP8_SWAP_PROMOTE_K`, for
measurement, 0 = never). What is left can still move one of GEMM2's fp8 inputs to its
neighbouring value (up to 7% of it) where the unswapped GEMM1 would not: in a small case
that is visible (one seed of six of a 10-token static-scale relu² layer, 2.7e-3 →
1.7e-2; tests/test_fp8_swap.py).
"""

from __future__ import annotations

import os

GEMMS = ("direct1", "direct2", "plan1", "plan2")
BLOCK = "block"
# The MMA's row side: a tile with at least this many rows is a native wgmma already.
WGMMA_ROWS = 64
# Block-scaled weights swap in these GEMMs at row tiles up to this many rows (see above).
BLOCK_SCALED_GEMMS = ("plan1", "plan2")
BLOCK_SCALED_ROWS = 16
# K loops at least this long keep their stages (`swapped_stages`).
LONG_K_STEPS = 32
# Swapped pipelines are not made shallower than this (`swapped_stages`).
MIN_FEWER_STAGES = 3


def _parse(value: str) -> frozenset[str]:
    value = value.strip()
    if value in ("", "1"):
        return frozenset(GEMMS)
    if value == "0":
        return frozenset()
    names = frozenset(name.strip() for name in value.split(",") if name.strip())
    unknown = names - {*GEMMS, BLOCK}
    if unknown:
        raise ValueError(f"MOEKIT_FP8_SWAP_AB: unknown name(s) {sorted(unknown)}; expected "
                         f"'0', '1' or names from {(*GEMMS, BLOCK)}")
    return names


SWAPPED = _parse(os.environ.get("MOEKIT_FP8_SWAP_AB", "1"))
_STAGES = os.environ.get("MOEKIT_FP8_SWAP_STAGES", "rule")
PROMOTE_K = int(os.environ.get("MOEKIT_FP8_SWAP_PROMOTE_K", "128"))


def swap_ab(gemm: str, rows: int, weight_rows: int, weight_per_k: bool) -> bool:
    """Whether `gemm` computes a tile of `rows` token rows × `weight_rows` weight rows
    swapped: it is switched on, the token rows are fewer than the MMA's row side, the
    weight rows fill it, and — where the weight's scales vary along K — the tile is one
    block-scaled weights gain in (or `block` is switched on)."""
    if weight_per_k and BLOCK not in SWAPPED and (
            gemm not in BLOCK_SCALED_GEMMS or rows > BLOCK_SCALED_ROWS):
        return False
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


def launch_stages(swap: bool, stages: int, k_steps: int) -> int:
    """The pipeline depth a GEMM launches with: `swapped_stages` if it is swapped, else
    its config's `stages`."""
    return swapped_stages(stages, k_steps) if swap else stages
