"""The default tile configuration: an analytic guess that is good without tables.

The row tile `block_m` follows the rows an active expert receives (M·k spread over
min(E, M·k) experts). While the layer is memory-bound (decode up to a few hundred
tokens), every extra block of an expert re-streams that expert's weight tiles, so
`block_m` is chosen to hold the *busiest* expert's rows in one block — the mean plus
about two standard deviations of a balanced (Poisson-like) count — and padding rows,
which cost only idle tensor-core time, are accepted. Past ~64 rows per expert the
GEMMs become compute-bound and take the large 128-row tile; below that the tile stops
at 64 even when the busiest expert would need 128 (granite at M = 256: 51 rows on
average, 115 µs with 128-row tiles, 101 µs with 64 on the H100: the few experts that
take a second 64-row block cost less than every block computing 128 rows).

At 128 rows the 16-bit tiles take tail tiles (`ExpertsConfig.tail_block_m` = 64): an
expert's run is padded to 64 rows, and its odd last 64-row block computed 64 rows high.
Padding to 128 cost 14–38% on the cells with ~256 rows per expert (random against
exactly even routing); tail tiles measured 0.99–1.10× on every 128-row cell swept
(faster on 15 of 17; GEMM1 gains, GEMM2 keeps its time). With both GEMMs Gluon kernels
they still win on the H100 over every bf16 preset at M = 2048–8192 (none: 0.89–1.11×,
median 0.985×) but mixtral, whose experts' weights are far larger than L2: there
(`tail_tiles_desync`) the Gluon GEMMs' programs share each weight column through L2 only
while they run its tiles in step, and a tail tile, ending early, puts its program out of
step — the GEMMs read 24–41% more DRAM (Nsight Compute). GEMM1's excess is the persistent
schedule's (one program per tile reads no more with tails); GEMM2's (K = 14,336, ~190 µs
a tile) stays under every schedule tried, tiles claimed in order from a counter included.
From 4 row tiles an expert (M ≥ 2048) the layer is 1.02–1.13× faster without tails;
below, tails tie or win by up to 3% (H100, three interleaved rounds; bench/NOTES.md,
session 54). One program per tile runs 1.03–1.10× slower than persistent programs without
tails. fp8 mixtral keeps its tails (0.95–1.00×): its GEMM1's tail tile idles one
warpgroup, as long as a whole tile, and its GEMM2 runs one program per tile up to
M = 4096 (`moekit._gluon.programs_drift_apart`).

For a handful of tokens the direct path (`ExpertsConfig.block_m` = 1,
`moekit.experts_direct`) skips the plan and the separate combine. On the H100 it
measured 1.00–1.15× the plan path at M = 1 on every preset and 0.99–1.15× at M = 2–4
on the presets with 32 or more experts; slower on mixtral at M = 2–4 (0.92–0.96×: its
tokens' pairs often share one of 8 experts too large for L2 to serve the second read)
and at M = 8 on five of the seven presets (0.81–0.98×) (bench/NOTES.md, direct path).
At one or two tokens its GEMM2 splits a token's slots over programs
(`direct_slots_per_program`): 1.04–1.20× faster on the H200.

Few, narrow experts (granite: 40 experts of I = 512, so a row block of every expert is
only 160 GEMM1 programs of 128 columns on 132 SMs) leave SMs idle in the last wave at the
tiles above, whose shared memory allows one GEMM1 program per SM. Such a layer
(`narrow_layer`) sizes its row tile to the average expert's rows (the extra blocks of the
busiest experts re-read weights from L2) and, up to 32 rows, takes 128 × 64 tiles in 3
stages for both GEMMs, two GEMM1 programs per SM. H200, granite, graph replay
(`bench/results/h200-20261202-narrow-layer-experiment-s18b.md`): 1.04–1.14× faster at
M = 16–144 and within 1.2% of the best of 11 variants there; at M = 160 (32 rows on
average) 0.98× and at M = 8 1.01×. The same tiles were 1.02–1.14× slower than the
heuristic's on the six presets with more column tiles (`moekit tune`'s kept trials).
Tensor-parallel shards are narrow too (`…-narrow-layer-experiment-tp-s18.md`): qwen3 and
olmoe over 4 GPUs 1.01–1.10× faster up to 256 tokens, but 0.92× for qwen3 at M = 512 (32
rows on average, where the 64-row tiles win) and 0.97–0.99× for mixtral over 8 GPUs at
M = 8–64; within 1.09× of the best variant everywhere measured.

At 16-row blocks, layers whose H and I are 128-element multiples take the 32-row blocks'
128 × 128 tiles in 3 stages (`wide_16_row_tiles`): mixtral's GEMM2 at 64 columns made 1.7
rounds of long programs (the layer 1.044–1.049× faster at M = 8–32 on the H200), the other
presets within −1%…+4%; gpt-oss (a partial last column tile) and narrow layers of more
than 16 experts keep their tiles.

`group_m` = 8 orders programs so that consecutive ones share a weight column tile,
which then comes from L2 for an expert's second and later blocks.

Tile shapes were picked from sweeps on an H100 (bench/NOTES.md, the results
`bench/results/h100-sxm-20261123-sweep-tiles-*.json`), the 16-bit 32- and 64-row tiles
from `moekit tune` on an H200 (`bench/results/h200-20261202-tune-bf16-*-s17.json`: six
presets, M = 8–2048); the sweeps are the evidence, this function the rule. `moekit tune`
repeats such a sweep on any GPU.
"""

from __future__ import annotations

import dataclasses
import math
import os

from moekit._gluon import HOPPER_L2_BYTES
from moekit._host_cache import host_cache
from moekit._intmath import cdiv, next_power_of_2
from moekit.tuning.config import DIRECT_BLOCK_M, ExpertsConfig, GemmConfig

#: A measurement control: `MOEKIT_TAIL_TILES=0` gives the 128-row tiles no tail tiles
#: (runs padded to 128 rows), for A/Bs against the default (session 53: with both GEMMs
#: Gluon kernels, mixtral bf16 M = 2048-3072 measured 1.09-1.14x faster without).
TAIL_TILES = os.environ.get("MOEKIT_TAIL_TILES", "1") != "0"

# `tail_tiles_desync`: at least this many rows an expert on average (4 row tiles).
_DESYNC_MIN_ROWS = 512

_DIRECT_MAX_TOKENS = 4
_DIRECT_MIN_EXPERTS = 32
# fp8: tokens × hidden up to which the direct path wins (M ≤ 4 at H = 2048, M = 1 at
# deepseek-v3's 7168; bench/results/h200-20261202-direct-fp8-two-groups.md).
_DIRECT_FP8_MAX_TOKEN_VALUES = 8192
# 16-bit direct GEMM2: with at least this many programs at 32-wide column tiles, one
# program per token (H100: 32 × 128 tiles within 3.7% of the best of 7 on every cell;
# H200: 64-wide tiles with split slots up to 7% slower on deepseek-v3 at M = 1–4).
_DIRECT_WIDE_PROGRAMS = 192
# Below it, 64-wide tiles and a token's k slots split into parts until M × parts × H/64
# programs reach this many (an fp8 step carries half the bytes: twice as many measured
# best, and at every token count of the fp8 direct path).
_DIRECT_GEMM2_PROGRAMS = 256
# SMs of an H100 SXM and an H200, for `narrow_layer` when the device is not known.
HOPPER_SMS = 132
# A layer is narrow when one row block per expert makes fewer 128-column GEMM1 programs
# than this many per SM.
_NARROW_PROGRAMS_PER_SM = 2
# A narrow layer's row tile holds the average expert's rows, not the busiest's; up to 32
# rows it takes the narrow tiles, beyond that the usual ones.
_NARROW_MAX_BLOCK_M = 32
# The narrow layer's tiles: GEMM1 needs 3 × 35–37 KB of shared memory (two programs per
# SM), GEMM2 3 × 18–20 KB.
_NARROW_TILE = GemmConfig(128, 64, 8, 4, 3)
# The 32-row blocks' tiles, memory-bound: 128 columns × 128-deep K in 3 stages.
_WIDE_TILE = GemmConfig(128, 128, 8, 4, 3)
# Narrow layers of at most this many experts take the wide tiles at 16-row blocks too.
_WIDE_16_NARROW_MAX_EXPERTS = 16


def rows_per_expert(num_tokens: int, num_experts: int, top_k: int) -> float:
    """Average rows an active expert receives under balanced routing."""
    pairs = num_tokens * top_k
    return pairs / max(1, min(num_experts, pairs))


def pick_block_m(num_tokens: int, num_experts: int, top_k: int) -> int:
    """Row tile: the busiest expert's expected rows in one block, 16..64; 128 once the
    average expert has 64 rows."""
    rows = rows_per_expert(num_tokens, num_experts, top_k)
    if rows >= 64:
        return 128
    busiest = rows + 2.0 * math.sqrt(rows)
    return max(16, min(64, 1 << math.ceil(math.log2(max(busiest, 1.0)))))


def use_direct_path(num_tokens: int, num_experts: int, top_k: int, dtype_bytes: int = 2) -> bool:
    """Whether the direct path beats the plan path (16-bit inputs; see the module doc)."""
    if dtype_bytes > 2:
        return False
    return num_tokens == 1 or (num_tokens <= _DIRECT_MAX_TOKENS
                               and num_experts >= _DIRECT_MIN_EXPERTS)


def use_direct_fp8_path(num_tokens: int, num_experts: int, hidden: int) -> bool:
    """Whether the fp8 direct path beats the fp8 plan path: up to 4 tokens on 32 or more
    experts, and up to `_DIRECT_FP8_MAX_TOKEN_VALUES` values of hidden in all (H200:
    1.03–1.42× on qwen3, granite, olmoe at M = 1 and 4; mixtral's 8 experts 0.85–0.96×,
    bench/NOTES.md, GEMM2 split over slots). Session 11, five presets × three schemes ×
    M = 1, 2, 4: 1.07–1.43× at M = 1; at M = 2–4 0.98× or better but for block scales at
    M = 4 on olmoe, deepseek-v2-lite (since won by two-group K tiles, session 12) and
    deepseek-v3, and deepseek-v3 (H = 7168) at M = 2 in every scheme (0.87–0.97×;
    block, session 12: 0.91×, and 0.97× at M = 4) — where M × H passes 8192."""
    return (num_tokens <= _DIRECT_MAX_TOKENS and num_experts >= _DIRECT_MIN_EXPERTS
            and num_tokens * hidden <= _DIRECT_FP8_MAX_TOKEN_VALUES)


def direct_slots_per_program(num_tokens: int, top_k: int, hidden: int,
                             dtype_bytes: int = 2) -> int:
    """How many of a token's k slots one direct GEMM2 program sums (its `group_m`): k,
    unless M × H/64 programs are fewer than `_DIRECT_GEMM2_PROGRAMS` (twice that for
    fp8); then the slots are split into as many parts as make up the difference (at
    most k parts: a program per slot)."""
    programs = _DIRECT_GEMM2_PROGRAMS * 2 // min(2, dtype_bytes)
    tiles = max(1, num_tokens * math.ceil(hidden / 64))
    parts = min(top_k, max(1, math.ceil(programs / tiles)))
    return math.ceil(top_k / parts)


# `gemm2_k_parts`: split K until the grid has this many programs an SM, into at most
# `_K_PARTS_MAX` parts of at least `_K_PART_MIN_STEPS` K steps each.
_K_PARTS_PROGRAMS_PER_SM = 2
_K_PARTS_MAX = 4
_K_PART_MIN_STEPS = 16


def gemm2_k_parts(programs: int, k_steps: int, num_sms: int = HOPPER_SMS) -> int:
    """How many parts the plan path's fp8 GEMM2 splits its K loop into: a power of two
    that brings its `programs` (row tiles × column tiles) to two an SM, where each part
    keeps at least `_K_PART_MIN_STEPS` of the `k_steps`; 1 elsewhere. At mixtral M = 1
    the 128 programs of 112 steps, one an SM, stream w2 at ~65% of the DRAM bandwidth, and
    a proxy of the same bytes over 2 and 4 times the programs ran the layer 1.07× and
    1.07–1.09× faster (H100, bench/NOTES.md, session 67); the parts' float32 sums are
    added by the combine."""
    parts = 1
    while (programs * parts < _K_PARTS_PROGRAMS_PER_SM * num_sms and parts < _K_PARTS_MAX
           and k_steps >= 2 * parts * _K_PART_MIN_STEPS):
        parts *= 2
    return parts


def direct_tiles(num_tokens: int, top_k: int, hidden: int, dtype_bytes: int = 2) -> ExpertsConfig:
    """The direct path's tiles: GEMM1 32 × 128 (within 3% of the best of 7 tiles on every
    cell measured on the H100). GEMM2 32 × 128, a program per token, where that makes
    `_DIRECT_WIDE_PROGRAMS` (16-bit); else 64 × 128 with a token's slots split over
    programs by `direct_slots_per_program` (H200: within 2% of the best of 6 tiles × 3
    splits on every direct-path cell timed at the rule's split, 1.04–1.20× faster than a
    program per token at M = 1–2; bench/NOTES.md)."""
    gemm1 = GemmConfig(32, 128, 1, 4, 5)
    if dtype_bytes >= 2 and num_tokens * hidden // 32 >= _DIRECT_WIDE_PROGRAMS:
        return ExpertsConfig(DIRECT_BLOCK_M, gemm1, GemmConfig(32, 128, top_k, 4, 5))
    per = direct_slots_per_program(num_tokens, top_k, hidden, dtype_bytes)
    return ExpertsConfig(DIRECT_BLOCK_M, gemm1, GemmConfig(64, 128, per, 4, 4))


def tiles_for_block_m(block_m: int, dtype_bytes: int = 2, aligned: bool = True,
                      wide_16: bool = False) -> ExpertsConfig:
    """The GEMM tiles the heuristic pairs with a row tile (the direct path's at one token).

    `aligned`: H and I are multiples of 8 elements (16 bytes of a 16-bit row). Other rows
    load unvectorised, and the wide 32-row tile then spills (6.5 KB in GEMM2 at I = 264
    before the kernels were told rows of 8k elements are aligned, `ROW_ALIGN`; none since,
    sm_90 `ptxas -v`), so such shapes keep the narrower 32- and 64-row tiles. `wide_16`:
    16-row blocks take the 32-row blocks' tiles too (`wide_16_row_tiles`).
    """
    if block_m == DIRECT_BLOCK_M:
        return direct_tiles(1, 1, 0)
    if block_m <= 32:
        # Memory-bound: long reduction tiles keep many bytes in flight per program.
        if (block_m == 32 or wide_16) and dtype_bytes <= 2 and aligned:
            # Twice the columns per program (H200 sweeps, 29 cells: 0.97× / 0.98× the
            # 64-column tile's layer time, geometric mean; mixtral M = 64 0.93×).
            return ExpertsConfig(block_m, _WIDE_TILE, _WIDE_TILE)
        block_k = 128 if dtype_bytes <= 2 else 64
        tile = GemmConfig(64, block_k, 8, 4, 4)
        return ExpertsConfig(block_m, tile, tile)
    if block_m == 64:
        if dtype_bytes <= 2 and aligned:
            # Wide, shallow K tiles (H200 sweeps, 25 cells: GEMM1 0.85×, GEMM2 0.95× the
            # layer time of the 64-column tiles below, geometric mean; faster in every cell).
            return ExpertsConfig(64, GemmConfig(256, 64, 8, 8, 3), GemmConfig(128, 64, 8, 4, 4))
        return ExpertsConfig(64, GemmConfig(64, 128, 8, 4, 3), GemmConfig(64, 64, 8, 4, 4))
    # Compute-bound: GEMM1 computes two 128-wide accumulators (gate and up) per program.
    if dtype_bytes > 2:
        # fp32 (the exact, slow path): 4 stages of 16-bit tiles would need 288 KB of shared
        # memory; K 32 × 3 stages needs 144 KB (an H100 block may use 227 KB).
        return ExpertsConfig(128, GemmConfig(128, 32, 8, 8, 3), GemmConfig(256, 64, 8, 8, 3))
    # Tail tiles: runs padded to 64 rows, not 128 (bench/NOTES.md, v5).
    return ExpertsConfig(128, GemmConfig(128, 64, 8, 8, 4), GemmConfig(256, 64, 8, 8, 3),
                         tail_block_m=64 if TAIL_TILES else 0)


def wide_16_row_tiles(num_experts: int, hidden: int, inter: int, narrow: bool) -> bool:
    """Whether 16-row blocks take the 32-row blocks' 128 × 128 tiles in 3 stages instead of
    64 × 128 in 4 (16-bit): where H and I are 128-element multiples (whole column tiles),
    and on a narrow layer (`narrow`) only with ≤ 16 experts.

    H200, whole layer, graph replay (bench/results/h200-20261203-small-m-experiment-s27*.md):
    mixtral 1.044–1.049× at M = 8–32 (GEMM2 1.13×: 448 programs of 64 columns, each
    streaming 1.8 MB, make 1.7 rounds; 224 of 128 fit one) and 0.987–1.012× at M = 4–6; its
    tensor-parallel shards 1.005–1.05× (I = 7168) and, narrow, 1.02–1.18× (I = 3584, 1792;
    0.96× at tp4 M = 4); olmoe, qwen3, deepseek-v2-lite, deepseek-v3 0.990–1.037×. Not
    taken: gpt-oss (H = I = 2880, a partial last column tile: 0.95–1.006×) and granite's 40
    narrow experts, whose narrow tiles (64-deep K, two GEMM1 programs per SM) were 1.04–1.10×
    faster at M ≥ 12."""
    if hidden % 128 or inter % 128:
        return False
    return not narrow or num_experts <= _WIDE_16_NARROW_MAX_EXPERTS


def narrow_layer(num_experts: int, inter: int, num_sms: int = HOPPER_SMS) -> bool:
    """Whether one row block per expert makes fewer than `_NARROW_PROGRAMS_PER_SM` GEMM1
    programs of 128 columns per SM (granite's 40 × 512: 160 on 132 SMs)."""
    return num_experts * cdiv(inter, 128) < _NARROW_PROGRAMS_PER_SM * num_sms


def narrow_row_tile(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int,
                    num_sms: int = HOPPER_SMS) -> int | None:
    """The row tile of a narrow layer's own tiles (16 or 32: the average expert's rows), or
    None where they do not apply: not narrow, more rows, or rows of H or I that are not
    16-element multiples (whose unvectorised loads the wider tiles would spill)."""
    if hidden % 16 or inter % 16 or not narrow_layer(num_experts, inter, num_sms):
        return None
    rows = rows_per_expert(num_tokens, num_experts, top_k)
    block_m = max(16, next_power_of_2(math.ceil(rows)))
    return block_m if block_m <= _NARROW_MAX_BLOCK_M else None


# The 16-bit Gluon GEMM1 takes narrow column tiles below this many whole tiles per SM:
# measured, bench/results/h200-20261203-narrow-columns-experiment-s24.md (granite at
# 2.4 rounds 1.04× faster narrow, at 3.6 0.90×; the one loss taken: mixtral/tp8 at
# M = 1024, 1.7 rounds counted, 0.955×).
NARROW_COLUMNS_BELOW = 2.5


@host_cache(maxsize=4096)  # pure, and on every call's host path
def gluon_gemm1_narrow_columns(num_tokens: int, num_experts: int, top_k: int, inter: int,
                               num_sms: int = HOPPER_SMS) -> bool:
    """Whether the 16-bit Gluon GEMM1 (128-row tiles) takes 64 gate + 64 up columns per
    tile instead of 128 + 128: where its tiles of 128 make fewer than
    `NARROW_COLUMNS_BELOW` rounds of the persistent grid, GEMM1 is bound by streaming
    w13 (granite's 40 experts at M = 512: 160 tiles of 786 KB of weights for 132 SMs),
    and tiles of half the weight rows spread that stream over more programs
    (bench/NOTES.md, sessions 23–24). Counted for balanced routing, each expert's rows in
    64-row blocks, two to a tile."""
    rows = rows_per_expert(num_tokens, num_experts, top_k)
    experts = min(num_experts, num_tokens * top_k)
    tiles = experts * cdiv(math.ceil(rows / 64), 2) * cdiv(inter, 128)
    return tiles < NARROW_COLUMNS_BELOW * num_sms


def tail_tiles_desync(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int,
                      dtype_bytes: int = 2) -> bool:
    """Whether tail tiles cost the persistent Gluon GEMMs more than they save: one expert's
    w2 outgrows L2 (so programs share its columns only while in step) and the experts
    average `_DESYNC_MIN_ROWS` rows or more (tails a small share of the work). Mixtral
    bf16 from M = 2048 (H100, bench/results/h100-sxm-20261206-tail-cost-*-s54.md)."""
    w2_bytes = hidden * inter * dtype_bytes
    return (w2_bytes > HOPPER_L2_BYTES
            and rows_per_expert(num_tokens, num_experts, top_k) >= _DESYNC_MIN_ROWS)


@host_cache(maxsize=4096)  # pure, and on every call's host path
def default_config(
    num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, dtype_bytes: int = 2,
    num_sms: int = HOPPER_SMS,
) -> ExpertsConfig:
    """Pick tiles for `fused_experts` on M tokens routed k-of-E, hidden H, intermediate I,
    on a GPU of `num_sms` SMs."""
    if use_direct_path(num_tokens, num_experts, top_k, dtype_bytes):
        return direct_tiles(num_tokens, top_k, hidden)
    aligned = hidden % 8 == 0 and inter % 8 == 0  # 16-byte rows (`tiles_for_block_m`)
    narrow = narrow_row_tile(num_tokens, num_experts, top_k, hidden, inter, num_sms)
    wide_16 = wide_16_row_tiles(num_experts, hidden, inter, narrow is not None)
    if dtype_bytes <= 2 and narrow:
        if narrow == 16 and wide_16:  # a narrow layer of few experts (see wide_16_row_tiles)
            return tiles_for_block_m(16, dtype_bytes, aligned, wide_16)
        return ExpertsConfig(narrow, _NARROW_TILE, _NARROW_TILE)
    config = tiles_for_block_m(pick_block_m(num_tokens, num_experts, top_k), dtype_bytes,
                               aligned, wide_16)
    if config.tail_block_m and tail_tiles_desync(num_tokens, num_experts, top_k, hidden,
                                                 inter, dtype_bytes):
        return dataclasses.replace(config, tail_block_m=0)
    return config
