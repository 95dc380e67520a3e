"""Triton kernels that build the dispatch plan (see `moekit.dispatch_plan`).

Two launches, no host synchronisation:

    _count_pairs_kernel   grid (chunks,)   per-chunk histogram of expert ids
    _place_pairs_kernel   grid (programs,) every program derives the global per-expert
                                           totals and padded offsets from the histograms,
                                           scatters its own chunk's pairs to their slots
                                           (stable: pair order within an expert), and
                                           fills its share of blocks with expert ids and
                                           padding sentinels.

With tail tiles (TILE_M = 2·BLOCK_M) the place kernel also writes the GEMMs' work list:
each expert's run in TILE_M-row tiles, a run's odd last block marked as a tail.

When the pairs fit one chunk (decode), the count is folded into the second kernel and
only one launch runs. Ids outside [0, E) fall into an extra "dropped" bin, bin E. With
an expert map (expert parallelism) each global id is first mapped to its local id, so
pairs routed to other ranks' experts land in the dropped bin too. The place kernel also
writes the inverse map pair → slot (−1 for dropped pairs) that unpermute reads.
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
def _fill_tiles(tiles_ptr, t, in_range, starts, ends, counts, tile_ends, total, is_expert,
                bins, PLAN_M: tl.constexpr, TILE_M: tl.constexpr):
    """Work-list entries t: each expert's run (a multiple of PLAN_M = TILE_M / 2 slots) in
    `counts` = ⌈run / TILE_M⌉ tiles (`tile_ends` their running sum, `total` their sum), in
    expert order; entry = first plan block · 2 + is_tail, where is_tail marks a run's odd
    last block; −1 past the last tile."""
    owner = tl.sum(((tile_ends[None, :] <= t[:, None]) & is_expert[None, :]).to(tl.int32), 1)
    mine = bins[None, :] == owner[:, None]
    run_start = tl.sum(tl.where(mine, starts[None, :], 0), 1)
    run_end = tl.sum(tl.where(mine, ends[None, :], 0), 1)
    first_tile = tl.sum(tl.where(mine, (tile_ends - counts)[None, :], 0), 1)
    first_slot = run_start + (t - first_tile) * TILE_M
    is_tail = (first_slot + TILE_M > run_end).to(tl.int32)
    entry = tl.where(t < total, first_slot // PLAN_M * 2 + is_tail, -1)
    tl.store(tiles_ptr + t, entry, mask=in_range)


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
def _place_pairs_kernel(
    topk_ids_ptr,  # [M*k] int32
    expert_map_ptr,  # [E_global] int32 global → local id (read only when HAS_MAP)
    counts_ptr,  # [chunks, BINS] int32 (unused when SINGLE_CHUNK)
    bases_ptr,  # [programs, BINS] int32 scratch: slot base per expert of this program's chunk
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
    CHUNK: tl.constexpr,
    BINS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_M: tl.constexpr,  # 0, or 2·BLOCK_M: write the tail-tile work list
    BLOCK_TILE: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    HAS_MAP: tl.constexpr,
    SCAN_ROWS: tl.constexpr,  # chunk histograms summed per step (a power of two)
):
    """Grid (programs,): program p places chunk p's pairs and fills its blocks (and the
    work-list entries of the same indices: there are fewer tiles than blocks).

    Every program recomputes the per-expert totals (a few KB read from L2) instead of
    waiting for a separate scan launch.
    """
    pid = tl.program_id(0)
    bins = tl.arange(0, BINS)
    is_expert = bins < num_experts

    # This chunk's ids and histogram; the totals over all chunks and the pairs before us.
    # With a single chunk every program reads it: all need its totals, program 0 places it.
    chunk = 0 if SINGLE_CHUNK else pid
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1)
    ids = _local_bins(ids, expert_map_ptr, num_global, num_experts, HAS_MAP)
    if SINGLE_CHUNK:
        own = tl.histogram(ids, BINS)
        totals = own
        before = tl.zeros([BINS], dtype=tl.int32)
    else:
        own = tl.load(counts_ptr + pid * BINS + bins, mask=pid < num_chunks, other=0)
        totals = tl.zeros([BINS], dtype=tl.int32)
        before = tl.zeros([BINS], dtype=tl.int32)
        # SCAN_ROWS histograms per load, so that many loads are in flight at once.
        for c0 in range(0, num_chunks, SCAN_ROWS):
            c = c0 + tl.arange(0, SCAN_ROWS)
            rows = tl.load(counts_ptr + c[:, None] * BINS + bins[None, :],
                           mask=(c < num_chunks)[:, None], other=0)
            totals += tl.sum(rows, 0)
            before += tl.sum(tl.where((c < pid)[:, None], rows, 0), 0)

    padded = tl.where(is_expert, (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    ends = tl.cumsum(padded, 0)  # end slot of each expert's padded run
    starts = ends - padded
    if pid == 0:
        tl.store(expert_offsets_ptr + bins, starts, mask=bins <= num_experts)

    # Scatter: sorting (expert, position) keys gives each pair its rank within its
    # expert in this chunk; the slot is the expert's start + pairs in earlier chunks +
    # that rank. The per-expert base goes through scratch memory to be gathered by key.
    if pid < num_chunks:
        local_starts = tl.cumsum(own, 0) - own
        tl.store(bases_ptr + pid * BINS + bins, starts + before - local_starts)
        tl.debug_barrier()
        keys = tl.sort(ids * CHUNK + tl.arange(0, CHUNK))
        expert = keys // CHUNK
        pair = pid * CHUNK + keys % CHUNK
        rank = tl.arange(0, CHUNK)  # position in the sorted chunk
        keep = expert < num_experts
        slot = tl.load(bases_ptr + pid * BINS + expert, mask=keep, other=0) + rank
        tl.store(sorted_pairs_ptr + slot, pair, mask=keep)
        # The inverse map, written while the slots are at hand: every pair of the chunk
        # (padding lanes past M*k are masked out), dropped ones with −1.
        tl.store(pair_slots_ptr + pair, tl.where(keep, slot, -1), mask=pair < num_pairs)

    # Blocks: the expert owning each block is the number of runs that end at or before
    # the block's first slot; slots past that expert's real pairs get the sentinel.
    real_ends = tl.where(is_expert, starts + totals, 0)
    used = tl.sum(padded, 0)
    if TILE_M:  # per-expert tile counts of the work list, for every block tile below
        tile_counts = (padded + TILE_M - 1) // TILE_M
        tile_ends = tl.cumsum(tile_counts, 0)
        num_tiles = tl.sum(tile_counts, 0)
        if pid == 0:  # the work list's length, after the list
            tl.store(tiles_ptr + max_tiles, num_tiles)
    first_block = pid * blocks_per_program
    for t in range(0, blocks_per_program, BLOCK_TILE):
        block = first_block + t + tl.arange(0, BLOCK_TILE)
        in_range = (block < num_blocks) & (t + tl.arange(0, BLOCK_TILE) < blocks_per_program)
        block_start = block * BLOCK_M
        owner = tl.sum(
            ((ends[None, :] <= block_start[:, None]) & is_expert[None, :]).to(tl.int32), 1
        )
        live = block_start < used
        tl.store(block_experts_ptr + block, tl.where(live, owner, -1), mask=in_range)
        owner_end = tl.sum(tl.where(bins[None, :] == owner[:, None], real_ends[None, :], 0), 1)
        owner_end = tl.where(live, owner_end, 0)
        slots = block_start[:, None] + tl.arange(0, BLOCK_M)[None, :]
        is_padding = slots >= owner_end[:, None]
        tl.store(
            sorted_pairs_ptr + slots,
            tl.full([BLOCK_TILE, BLOCK_M], 0, tl.int32) + num_pairs,
            mask=in_range[:, None] & is_padding,
        )
        if TILE_M:
            _fill_tiles(tiles_ptr, block, in_range & (block < max_tiles), starts, ends,
                        tile_counts, tile_ends, num_tiles, is_expert, bins, BLOCK_M, TILE_M)
