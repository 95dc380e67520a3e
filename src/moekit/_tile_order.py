"""The order in which the Triton GEMMs of the plan path take their tiles.

`_tile_of` groups GROUP_M row tiles and walks their column tiles in turn, so the programs
reading one weight column tile run side by side; but its groups cut through experts, and
an expert cut in two reads its weights once per group, a wave apart, the second time
mostly from DRAM. `_expert_tile_of` groups only within an expert (both in
`moekit._experts_kernels`): at deepseek-v3 M = 8192 (Nsight Compute, H100, session 49 in
bench/NOTES.md) GEMM1 read 17.4 GB from DRAM instead of 23.7 and took 7.4 ms instead of
8.7, GEMM2 8.1 GB instead of 9.7.

The layer (`moekit bench`, H100, four rounds each, graph replay) ran 1.06–1.16× faster
with it on deepseek-v3 at M = 2048–8192 and 1.02–1.05× on gpt-oss-120b at 2048–8192,
within noise on the cells whose GEMMs are Gluon's or whose tiles are under 128 rows.
At deepseek-v3 M = 16384 (four row tiles an expert) it read a third fewer GEMM1 bytes
but measured 0.94× in one A/B and 1.03× in another (power-bound: the clock moves with
the bytes), so it stays off there: `expert_groups` takes it below MAX_ROW_TILES row tiles
an expert on average, for the 128-row tiles of prefill (MIN_TILE_ROWS) only. Smaller
tiles gained nothing, and the order's three dependent loads before the K loop cost the
16-row swigluoai GEMM1 4 bytes of register spill on sm_90. `MOEKIT_EXPERT_GROUPS=1` /
`=0` at import forces it on / off (`FORCED`).
"""

from __future__ import annotations

import os

FORCED = {"1": True, "0": False}.get(os.environ.get("MOEKIT_EXPERT_GROUPS", ""))
MAX_ROW_TILES = 4
MIN_TILE_ROWS = 128


def expert_groups(num_pairs: int, num_experts: int, tile_rows: int) -> bool:
    """Whether the Triton GEMMs take their tiles in groups that never split an expert:
    `num_pairs` rows over `num_experts` experts in row tiles of `tile_rows`."""
    if FORCED is not None:
        return FORCED
    return tile_rows >= MIN_TILE_ROWS and num_pairs < MAX_ROW_TILES * tile_rows * num_experts
