"""Triton kernels that build the dispatch plan (see `moekit.dispatch_plan`).

Up to `dispatch._FUSED_PAIRS` pairs, one launch:

    _place_pairs_kernel   grid (programs,) every program histograms all ids itself (the
                                           per-expert totals, and the pairs before its
                                           chunk), places its chunk's pairs and fills
                                           its share of blocks

Beyond, three, each one pass without serial loops over the whole input:

    _count_pairs_kernel   grid (chunks,)   per-chunk histogram of expert ids
    _scan_counts_kernel   grid (bin groups,) the histograms → exclusive prefix over
                                           chunks (in place) and per-expert totals
    _place_pairs_kernel   grid (programs,) reads its chunk's prefix and the totals,
                                           scatters its chunk's pairs to their slots
                                           (stable: pair order within an expert), and
                                           fills its share of blocks with expert ids and
                                           padding sentinels.

A pair's rank among its expert's pairs in its chunk is counted by comparison with the
chunk's earlier pairs (CHUNK² compares, no sort: Triton's bitonic `tl.sort` took ~7 µs
for 256 keys and ~40 µs for 2048, bench/results/h200-20261202-plan-place-experiment.md).

The fp8 path runs the place kernel and its row quantiser as one launch
(`moekit._plan_quantize_kernels`), which calls `_place_pairs_kernel` as a function.

With tail tiles (TILE_M = 2·BLOCK_M) the place kernel also writes the GEMMs' work list:
each expert's run in TILE_M-row tiles, a run's odd last block marked as a tail.

Ids outside [0, E) fall into an extra "dropped" bin, bin E. With an expert map (expert
parallelism) each global id is first mapped to its local id, so pairs routed to other
ranks' experts land in the dropped bin too. The place kernel also writes the inverse map
pair → slot (−1 for dropped pairs) that unpermute reads.
"""

import triton
import triton.language as tl


@triton.jit
def _local_bins(ids, expert_map_ptr, num_global, num_experts, HAS_MAP: tl.constexpr):
    """Bin of each id: its (local) expert, or num_experts when the pair is dropped."""
    if HAS_MAP:
        # Global → local id; −1 (or any value outside [0, E)) means "not on this rank".
        known = (ids >= 0) & (ids < num_global)
        ids = tl.load(expert_map_ptr + ids, mask=known, other=-1)
    return tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)


@triton.jit
def _local_ids_kernel(ids_ptr, expert_map_ptr, out_ptr, num_ids, num_global, num_experts,
                      BLOCK: tl.constexpr):
    """`_local_bins` for every id, written as an id: the local expert, or −1 when dropped."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < num_ids
    ids = tl.load(ids_ptr + offs, mask=ok, other=-1)
    local = _local_bins(ids, expert_map_ptr, num_global, num_experts, True)
    tl.store(out_ptr + offs, tl.where(local == num_experts, -1, local), mask=ok)


@triton.jit
def _count_pairs_kernel(
    topk_ids_ptr,  # [M*k] int32
    expert_map_ptr,  # [E_global] int32 global → local id (read only when HAS_MAP)
    counts_ptr,  # [chunks, BINS] int32, out
    num_pairs,
    num_experts,
    num_global,
    CHUNK: tl.constexpr,
    BINS: tl.constexpr,
    HAS_MAP: tl.constexpr,
):
    """Grid (chunks,): one program histograms CHUNK consecutive pairs by expert."""
    chunk = tl.program_id(0)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1)
    bins = _local_bins(ids, expert_map_ptr, num_global, num_experts, HAS_MAP)
    hist = tl.histogram(bins, BINS)
    tl.store(counts_ptr + chunk * BINS + tl.arange(0, BINS), hist)


@triton.jit
def _scan_counts_kernel(
    counts_ptr,  # [chunks, BINS] int32: histograms in, exclusive prefix over chunks out
    totals_ptr,  # [BINS] int32, out: pairs per bin over all chunks
    num_chunks,
    BINS: tl.constexpr,
    SCAN_BINS: tl.constexpr,  # bins per program (a power of two ≤ BINS)
    ROWS: tl.constexpr,  # chunks per step (a power of two)
):
    """Grid (BINS / SCAN_BINS,): one program scans its bins' column over all chunks."""
    cols = tl.program_id(0) * SCAN_BINS + tl.arange(0, SCAN_BINS)
    carry = tl.zeros([SCAN_BINS], dtype=tl.int32)
    for r0 in range(0, num_chunks, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        ptrs = counts_ptr + rows[:, None] * BINS + cols[None, :]
        ok = (rows < num_chunks)[:, None]
        hist = tl.load(ptrs, mask=ok, other=0)
        tl.store(ptrs, carry[None, :] + tl.cumsum(hist, 0) - hist, mask=ok)
        carry += tl.sum(hist, 0)
    tl.store(totals_ptr + cols, carry)


@triton.jit
def _rank_in_chunk(topk_ids_ptr, expert_map_ptr, bins_of, chunk_start, num_pairs, num_global,
                   num_experts, CHUNK: tl.constexpr, HAS_MAP: tl.constexpr):
    """For each pair of the chunk, how many earlier pairs of the chunk share its bin:
    compared with the chunk's pairs 32 at a time ([CHUNK, 32] per step)."""
    rank = tl.zeros([CHUNK], dtype=tl.int32)
    lane = tl.arange(0, CHUNK)
    for j0 in tl.static_range(0, CHUNK, 32):
        offs_j = chunk_start + j0 + tl.arange(0, 32)
        ids_j = tl.load(topk_ids_ptr + offs_j, mask=offs_j < num_pairs, other=-1)
        bins_j = _local_bins(ids_j, expert_map_ptr, num_global, num_experts, HAS_MAP)
        earlier = (j0 + tl.arange(0, 32))[None, :] < lane[:, None]
        same = (bins_j[None, :] == bins_of[:, None]) & earlier
        rank += tl.sum(same.to(tl.int32), 1)
    return rank


@triton.jit
def _place_pairs_kernel(
    topk_ids_ptr,  # [M*k] int32
    expert_map_ptr,  # [E_global] int32 global → local id (read only when HAS_MAP)
    prefix_ptr,  # [chunks, BINS] int32: pairs per bin before each chunk (when SCANNED)
    totals_ptr,  # [BINS] int32: pairs per bin (when SCANNED)
    scratch_ptr,  # [programs, 4, BINS] int32: per-bin values each program gathers from
    sorted_pairs_ptr,  # [capacity] int32, out
    block_experts_ptr,  # [capacity / BLOCK_M] int32, out
    expert_offsets_ptr,  # [E + 1] int32, out
    pair_slots_ptr,  # [M*k] int32, out: slot of each pair, −1 when dropped
    tiles_ptr,  # [max_tiles + 1] int32, out: the work list, then its length (when TILE_M)
    num_pairs,
    num_experts,
    num_global,
    num_chunks,
    num_blocks,
    blocks_per_program,
    max_tiles,
    CHUNK: tl.constexpr,  # pairs per chunk, a power of two ≥ 32
    ALL_PAIRS: tl.constexpr,  # unless SCANNED: a power of two ≥ num_pairs
    BINS: tl.constexpr,
    EXPERTS_PER_PROGRAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_M: tl.constexpr,  # 0, or 2·BLOCK_M: write the tail-tile work list
    BLOCK_TILE: tl.constexpr,
    SCANNED: tl.constexpr,  # the totals and prefixes come from `_scan_counts_kernel`
    HAS_MAP: tl.constexpr,
):
    """Grid (programs,): program p places chunk p's pairs, writes experts
    [p·EXPERTS_PER_PROGRAM, +EXPERTS_PER_PROGRAM)'s blocks, work-list entries and
    padding, and fills its share of the blocks past the last run. Every per-bin value a
    program needs for a chunk pair or an expert of its own it gathers from its scratch
    rows: no [rows, BINS] reductions, which cost ~3 µs per 16 blocks (session 16)."""
    pid = tl.program_id(0)
    bins = tl.arange(0, BINS)
    is_expert = bins < num_experts

    # The totals over all pairs and the pairs before this chunk, per bin.
    if SCANNED:
        totals = tl.load(totals_ptr + bins)
        before = tl.load(prefix_ptr + pid * BINS + bins, mask=pid < num_chunks, other=0)
    else:  # few pairs: every program histograms them all
        offs_all = tl.arange(0, ALL_PAIRS)
        ids_all = tl.load(topk_ids_ptr + offs_all, mask=offs_all < num_pairs, other=-1)
        bins_all = _local_bins(ids_all, expert_map_ptr, num_global, num_experts, HAS_MAP)
        totals = tl.histogram(bins_all, BINS)
        # Pairs from this chunk on counted in the dropped bin, which no one reads.
        before = tl.histogram(tl.where(offs_all < pid * CHUNK, bins_all, num_experts), BINS)

    totals = tl.where(is_expert, totals, 0)
    padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)  # end slot of each expert's padded run
    starts = ends - padded
    used_blocks = tl.sum(padded, 0) // BLOCK_M
    if pid == 0:
        tl.store(expert_offsets_ptr + bins, starts, mask=bins <= num_experts)
    scratch = scratch_ptr + pid * 4 * BINS
    has_experts = pid * EXPERTS_PER_PROGRAM < num_experts
    if pid < num_chunks:
        tl.store(scratch + bins, starts + before)  # a chunk pair's slot, less its rank
    if has_experts:
        tl.store(scratch + BINS + bins, starts)
        tl.store(scratch + 2 * BINS + bins, totals)
    if TILE_M:  # each expert's run in TILE_M-row tiles, in expert order
        tile_counts = (padded + TILE_M - 1) // TILE_M
        tile_ends = tl.cumsum(tile_counts, 0)
        num_tiles = tl.sum(tile_counts, 0)
        if has_experts:
            tl.store(scratch + 3 * BINS + bins, tile_ends - tile_counts)
        if pid == 0:  # the work list's length, after the list
            tl.store(tiles_ptr + max_tiles, num_tiles)
    tl.debug_barrier()

    # Scatter: a pair's slot is its expert's start + its pairs in earlier chunks + its
    # rank in this chunk.
    if pid < num_chunks:
        chunk_start = pid * CHUNK
        offs = chunk_start + tl.arange(0, CHUNK)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1)
        bins_of = _local_bins(ids, expert_map_ptr, num_global, num_experts, HAS_MAP)
        rank = _rank_in_chunk(topk_ids_ptr, expert_map_ptr, bins_of, chunk_start, num_pairs,
                              num_global, num_experts, CHUNK, HAS_MAP)
        keep = bins_of < num_experts
        slot = tl.load(scratch + bins_of, mask=keep, other=0) + rank
        tl.store(sorted_pairs_ptr + slot, offs, mask=keep)
        # The inverse map, written while the slots are at hand: every pair of the chunk
        # (lanes past M*k are masked out), dropped ones with −1.
        tl.store(pair_slots_ptr + offs, tl.where(keep, slot, -1), mask=offs < num_pairs)

    # This program's experts: their blocks' expert id, their work-list entries (entry =
    # first plan block · 2 + is_tail, is_tail marking a run's odd last block) and the
    # sentinel in their last block's slots past their pairs.
    experts = pid * EXPERTS_PER_PROGRAM + tl.arange(0, EXPERTS_PER_PROGRAM)
    mine = experts < num_experts
    run_start = tl.load(scratch + BINS + experts, mask=mine, other=0)
    run_pairs = tl.load(scratch + 2 * BINS + experts, mask=mine, other=0)
    run_end = run_start + (run_pairs + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    tail = run_start + run_pairs
    pad = tail[:, None] + tl.arange(0, BLOCK_M)[None, :]
    tl.store(sorted_pairs_ptr + pad, tl.full([EXPERTS_PER_PROGRAM, BLOCK_M], 0, tl.int32)
             + num_pairs, mask=mine[:, None] & (pad < run_end[:, None]))
    if TILE_M:
        first_tile = tl.load(scratch + 3 * BINS + experts, mask=mine, other=0)
    run_blocks = (run_end - run_start) // BLOCK_M
    for j0 in range(0, tl.max(run_blocks, 0), BLOCK_TILE):
        j = j0 + tl.arange(0, BLOCK_TILE)[None, :]
        block = run_start[:, None] // BLOCK_M + j
        tl.store(block_experts_ptr + block, experts[:, None] + 0 * j,
                 mask=mine[:, None] & (j < run_blocks[:, None]))
        if TILE_M:  # a run's tiles are ⌈blocks / 2⌉ of its blocks' count: same loop
            first_slot = run_start[:, None] + j * TILE_M
            is_tail = (first_slot + TILE_M > run_end[:, None]).to(tl.int32)
            tl.store(tiles_ptr + first_tile[:, None] + j, first_slot // BLOCK_M * 2 + is_tail,
                     mask=mine[:, None] & (first_slot < run_end[:, None]))

    # Blocks past the last run: expert −1 and sentinel slots; work-list entries past the
    # last tile: −1 (the list is never longer than the plan's blocks).
    first_block = pid * blocks_per_program
    for t in range(0, blocks_per_program, BLOCK_TILE):
        block = first_block + t + tl.arange(0, BLOCK_TILE)
        in_range = (block < num_blocks) & (t + tl.arange(0, BLOCK_TILE) < blocks_per_program)
        rest = in_range & (block >= used_blocks)
        tl.store(block_experts_ptr + block, tl.full([BLOCK_TILE], -1, tl.int32), mask=rest)
        slots = block[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        tl.store(sorted_pairs_ptr + slots, tl.full([BLOCK_TILE, BLOCK_M], 0, tl.int32)
                 + num_pairs, mask=rest[:, None])
        if TILE_M:
            tl.store(tiles_ptr + block, tl.full([BLOCK_TILE], -1, tl.int32),
                     mask=in_range & (block >= num_tiles) & (block < max_tiles))
