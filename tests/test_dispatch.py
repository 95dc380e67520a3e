"""The dispatch plan: exact equality with the reference and the layout's invariants."""

import pytest
import torch

import moekit.dispatch
from moekit import reference
from moekit.dispatch import dispatch_plan, local_expert_ids
from moekit.dispatch_plan import max_padded_pairs


@pytest.fixture(autouse=True)
def poisoned_plan_buffers(monkeypatch):
    """The plan's tensors and scratch start as garbage, so an element the kernels do not
    write cannot pass for a correct zero."""
    carve = moekit.dispatch._int32_views

    def poisoned(device, sizes):
        views = carve(device, sizes)
        for view in views:
            view.fill_(-0x2152411)
        return views

    monkeypatch.setattr(moekit.dispatch, "_int32_views", poisoned)


def check_invariants(plan, topk_ids, num_experts):
    """What every consumer relies on, independent of the reference."""
    flat = topk_ids.reshape(-1).long().cpu()
    num_pairs = flat.numel()
    sorted_pairs = plan.sorted_pairs.long().cpu()
    blocks = plan.block_experts.long().cpu()
    offsets = plan.expert_offsets.long().cpu()
    real = sorted_pairs[sorted_pairs < num_pairs]
    valid = ((flat >= 0) & (flat < num_experts)).nonzero().flatten()
    # Every valid pair appears exactly once; dropped pairs never appear.
    assert torch.equal(real.sort().values, valid)
    assert (sorted_pairs <= num_pairs).all()
    # Offsets are padded to the block and ordered; blocks name their run's expert.
    assert offsets[0] == 0 and (offsets.diff() >= 0).all()
    assert (offsets % plan.block_m == 0).all()
    for e in range(num_experts):
        run = sorted_pairs[offsets[e] : offsets[e + 1]]
        pairs = run[run < num_pairs]
        assert (flat[pairs] == e).all()
        assert (pairs.diff() > 0).all(), "pairs of one expert keep their order"
        assert (blocks[offsets[e] // plan.block_m : offsets[e + 1] // plan.block_m] == e).all()
    assert (blocks[offsets[-1] // plan.block_m :] == -1).all()
    # pair_slots inverts sorted_pairs; dropped pairs have no slot.
    slots = plan.pair_slots.long().cpu()
    assert slots.shape == (num_pairs,)
    assert torch.equal(slots[real], (sorted_pairs < num_pairs).nonzero().flatten())
    dropped = torch.ones(num_pairs, dtype=torch.bool)
    dropped[valid] = False
    assert (slots[dropped] == -1).all()


CASES = [
    # (M, k, E, block_m, why)
    (1, 1, 1, 16, "one token, one expert"),
    (1, 8, 128, 16, "decode: a few experts of many"),
    (3, 2, 4, 16, "more slots than pairs"),
    (64, 8, 60, 16, "E not a power of two"),
    (40, 2, 1, 32, "all tokens on one expert"),
    (300, 4, 7, 64, "5 chunks in one launch: every program histograms all pairs"),
    (600, 8, 128, 16, "over 4096 pairs: count, scan and place launches, 19 chunks"),
    (20, 3, 1100, 16, "E > 1024"),
    (0, 4, 8, 16, "no tokens: empty plan, nothing to place"),
]


def check_tile_list(tiles, plan):
    """Tiles cover every used plan block exactly once, two of one expert or a run's last."""
    tiles = tiles.long().cpu()
    offsets = plan.expert_offsets.long().cpu()
    count = int(tiles[-1])
    entries = tiles[:count]
    assert (tiles[count:-1] == -1).all() and (entries >= 0).all()
    covered = []
    for entry in entries.tolist():
        block, is_tail = entry >> 1, entry & 1
        covered += [block] if is_tail else [block, block + 1]
        start = block * plan.block_m
        run_end = offsets[offsets > start].min()
        assert bool(is_tail) == (start + plan.block_m == run_end), "tail ⇔ the run's odd last block"
    assert covered == list(range(int(offsets[-1]) // plan.block_m))


TILE_LIST_CASES = [
    # (M, k, E, plan_m, why)
    (1, 1, 1, 16, "one pair: one tail"),
    (200, 1, 3, 64, "a few long runs"),
    (64, 8, 60, 16, "E not a power of two, runs of 1-3 blocks"),
    (300, 4, 7, 32, "several plan chunks"),
    (20, 3, 1100, 16, "E > 1024"),
    (2000, 4, 16, 16, "~500 blocks: several place programs fill the list"),
    (0, 4, 8, 16, "no tokens: an empty list"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("M,k,E,plan_m,why", TILE_LIST_CASES)
def test_tile_list_matches_reference_interpreter(M, k, E, plan_m, why):
    g = torch.Generator().manual_seed(M * 7 + E)
    ids = torch.randint(-1, E, (M, k), generator=g, dtype=torch.int32)
    plan = dispatch_plan(ids, E, plan_m, tile_m=2 * plan_m, backend="triton")
    expected = reference.dispatch_plan(ids, E, plan_m, tile_m=2 * plan_m)
    assert torch.equal(plan.tiles, expected.tiles)
    assert torch.equal(plan.sorted_pairs, expected.sorted_pairs), "the list leaves the plan be"
    check_tile_list(plan.tiles, plan)


def test_tile_m_must_be_twice_the_plan_rows():
    with pytest.raises(ValueError, match="tile_m"):
        dispatch_plan(torch.zeros(4, 1, dtype=torch.int32), 2, 16, tile_m=64)
    assert dispatch_plan(torch.zeros(4, 1, dtype=torch.int32), 2, 16).tiles is None


@pytest.mark.interpreter
@pytest.mark.parametrize("M,k,E,block_m,why", CASES)
def test_plan_matches_reference_interpreter(M, k, E, block_m, why):
    g = torch.Generator().manual_seed(M * 31 + E)
    ids = torch.randint(-1, E, (M, k), generator=g, dtype=torch.int32)
    if why == "all tokens on one expert":
        ids.zero_()
    plan = dispatch_plan(ids, E, block_m, backend="triton")
    expected = reference.dispatch_plan(ids, E, block_m)
    assert torch.equal(plan.sorted_pairs, expected.sorted_pairs)
    assert torch.equal(plan.block_experts, expected.block_experts)
    assert torch.equal(plan.expert_offsets, expected.expert_offsets)
    assert torch.equal(plan.pair_slots, expected.pair_slots)
    check_invariants(plan, ids, E)


@pytest.mark.interpreter
@pytest.mark.parametrize("M,k,E", [(300, 4, 40), (70, 8, 3)])
def test_scanned_plan_in_several_steps_interpreter(M, k, E, monkeypatch):
    # The count, scan and place launches on few pairs, the scan in steps of a few chunks.
    monkeypatch.setattr(moekit.dispatch, "_FUSED_PAIRS", 0)
    monkeypatch.setattr(moekit.dispatch, "_SCAN_VALUES", 4 * moekit.dispatch._SCAN_BINS)
    monkeypatch.setattr(moekit.dispatch, "_CHUNK", 64)
    g = torch.Generator().manual_seed(M + E)
    ids = torch.randint(-1, E, (M, k), generator=g, dtype=torch.int32)
    plan = dispatch_plan(ids, E, 16, tile_m=32, backend="triton")
    expected = reference.dispatch_plan(ids, E, 16, tile_m=32)
    for field in ("sorted_pairs", "block_experts", "expert_offsets", "pair_slots", "tiles"):
        assert torch.equal(getattr(plan, field), getattr(expected, field)), field
    check_invariants(plan, ids, E)


STRIDED_IDS = [
    # (a strided view of a contiguous [M, 4] int32 tensor, why)
    (lambda t: t[:, :1], "k = 1, a column of a wider tensor: reshape returns a row-strided view"),
    (lambda t: t.reshape(1, -1)[:, ::2], "M = 1, every other id of a row: a stride-2 view"),
    (lambda t: t[:, ::2], "every other column: strides (4, 2) flatten to one stride-2 view"),
    (lambda t: t.t().contiguous().t(), "column-major: no flat view, so reshape copies"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("view,why", STRIDED_IDS)
@pytest.mark.parametrize("launches", ["one", "count, scan, place"])
@pytest.mark.parametrize("mapped", [False, True], ids=["plain", "expert_map"])
def test_strided_ids_interpreter(view, why, launches, mapped, monkeypatch):
    # The kernels read the ids as one dense run; a view whose flat form is strided was
    # read as if contiguous, and the plan silently built from other ids.
    if launches != "one":
        monkeypatch.setattr(moekit.dispatch, "_FUSED_PAIRS", 0)
    g = torch.Generator().manual_seed(5)
    ids = view(torch.randint(-1, 6, (24, 4), generator=g, dtype=torch.int32))
    assert not ids.is_contiguous()
    table, E = half_remote_map(6, 1) if mapped else (None, 6)
    plan = dispatch_plan(ids, E, 16, expert_map=table, tile_m=32, backend="triton")
    expected = reference.dispatch_plan(ids.contiguous(), E, 16, expert_map=table, tile_m=32)
    for field in ("sorted_pairs", "block_experts", "expert_offsets", "pair_slots", "tiles"):
        assert torch.equal(getattr(plan, field), getattr(expected, field)), field


def test_capacity_depends_only_on_sizes():
    # Shapes must not depend on the routing, or CUDA graphs could not capture the plan.
    assert max_padded_pairs(8, 128, 16) == 8 * 16
    assert max_padded_pairs(1000, 4, 64) == 1280  # 1000 + 4·63, rounded up to 64
    assert max_padded_pairs(0, 4, 16) == 0


def test_sentinel_ids_are_dropped():
    # Expert-parallel sentinels (≥ E) and −1 both mean "no expert".
    ids = torch.tensor([[0, 5], [-1, 1]], dtype=torch.int32)
    plan = reference.dispatch_plan(ids, 2, 16)
    check_invariants(plan, ids, 2)
    assert plan.expert_offsets.tolist() == [0, 16, 32]


def test_bad_arguments():
    ids = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="topk_ids"):
        dispatch_plan(ids.float(), 4, 16)
    with pytest.raises(ValueError, match="block_m"):
        dispatch_plan(ids, 4, 24)
    with pytest.raises(ValueError, match="num_experts"):
        dispatch_plan(ids, 0, 16)


GPU_CASES = [
    (1, 8, 256, 16),
    (4096, 8, 128, 128),
    (16384, 8, 256, 128),  # past 64K pairs: 256-pair chunks
    (3000, 6, 2048, 64),  # E > 1024 with many chunks
    (512, 1, 3, 32),
    (512, 8, 64, 64),  # 4096 pairs: the last one-launch plan
    (4097, 1, 64, 64),  # one pair more: count, scan and place
    (8192, 8, 16, 64),  # 65536 pairs: the last plan of 128-pair chunks (512 of them)
]


@pytest.mark.gpu
@pytest.mark.parametrize("M,k,E,block_m", GPU_CASES)
def test_plan_matches_reference_gpu(M, k, E, block_m):
    g = torch.Generator(device="cuda").manual_seed(M + E)
    ids = torch.randint(-1, E, (M, k), generator=g, dtype=torch.int32, device="cuda")
    plan = dispatch_plan(ids, E, block_m)
    expected = reference.dispatch_plan(ids, E, block_m)
    assert torch.equal(plan.sorted_pairs, expected.sorted_pairs)
    assert torch.equal(plan.block_experts, expected.block_experts)
    assert torch.equal(plan.expert_offsets, expected.expert_offsets)
    assert torch.equal(plan.pair_slots, expected.pair_slots)


def half_remote_map(num_global, rank, device="cpu"):
    """Expert map of `rank` of two: it holds every other expert (odd/even ids), locally
    numbered 0, 1, …; the others map to −1. Interleaved so the local ids are a
    non-trivial relabelling of the global ones."""
    table = torch.full((num_global,), -1, dtype=torch.int32)
    mine = torch.arange(rank, num_global, 2)
    table[mine] = torch.arange(mine.numel(), dtype=torch.int32)
    return table.to(device), mine.numel()


def check_expert_map_plan(plan, ids, table, local_experts):
    """The plan of global ids through a map equals the plan of the mapped (local) ids."""
    flat = ids.long().cpu()
    known = (flat >= 0) & (flat < table.numel())
    local = torch.where(known, table.long().cpu()[flat.clamp(0, table.numel() - 1)], -1)
    local_plan = reference.dispatch_plan(local.to(torch.int32), local_experts, plan.block_m)
    for field in ("sorted_pairs", "block_experts", "expert_offsets", "pair_slots"):
        assert torch.equal(getattr(plan, field).cpu(), getattr(local_plan, field)), field
    check_invariants(plan, local.to(torch.int32), local_experts)


MAP_CASES = [
    # (M, k, E_global, block_m, why)
    (9, 4, 16, 16, "one launch (single chunk)"),
    (300, 4, 10, 32, "several chunks in one launch"),
    (1100, 4, 10, 32, "over 4096 pairs: the count kernel maps ids too"),
    (5, 2, 7, 16, "odd global E: the two ranks hold 4 and 3 experts"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("M,k,E,block_m,why", MAP_CASES)
def test_expert_map_interpreter(M, k, E, block_m, why):
    g = torch.Generator().manual_seed(M + 7 * E)
    # −1 and ids ≥ E_global (sentinels) are dropped before the map is consulted.
    ids = torch.randint(-1, E + 2, (M, k), generator=g, dtype=torch.int32)
    # Both ranks where it is cheap; the multi-chunk case costs ~13 s per run in the
    # interpreter, so it checks one rank.
    for rank in (1,) if M * k > 4096 else (0, 1):
        table, local = half_remote_map(E, rank)
        plan = dispatch_plan(ids, local, block_m, expert_map=table, backend="triton")
        expected = reference.dispatch_plan(ids, local, block_m, expert_map=table)
        for field in ("sorted_pairs", "block_experts", "expert_offsets", "pair_slots"):
            assert torch.equal(getattr(plan, field), getattr(expected, field)), field
        check_expert_map_plan(plan, ids, table, local)


def test_expert_map_reference_small():
    # Global experts 0..3; this rank holds 1 (local 0) and 3 (local 1).
    table = torch.tensor([-1, 0, -1, 1], dtype=torch.int32)
    ids = torch.tensor([[3, 0], [1, 3], [2, 9]], dtype=torch.int32)
    plan = reference.dispatch_plan(ids, 2, 16, expert_map=table)
    assert plan.sorted_pairs[:16].tolist() == [2] + [6] * 15
    assert plan.sorted_pairs[16:18].tolist() == [0, 3]
    assert plan.expert_offsets.tolist() == [0, 16, 32]
    assert plan.pair_slots.tolist() == [16, -1, 0, 17, -1, -1]


def test_expert_map_bad_arguments():
    ids = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="expert_map"):
        dispatch_plan(ids, 2, 16, expert_map=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="expert_map"):
        dispatch_plan(ids, 2, 16, expert_map=torch.zeros(2, 2, dtype=torch.int32))


def expected_local_ids(ids, table, local_experts):
    """Each id through the map, one at a time: −1 off the map or off this rank."""
    out = []
    for row in ids.tolist():
        mapped = [table[i].item() if 0 <= i < table.numel() else -1 for i in row]
        out.append([m if 0 <= m < local_experts else -1 for m in mapped])
    return out


@pytest.mark.interpreter
def test_local_expert_ids_interpreter():
    g = torch.Generator().manual_seed(3)
    E = 10
    # −2, −1 and ids ≥ E_global are off the map; 1,100 ids span two programs.
    ids = torch.randint(-2, E + 3, (275, 4), generator=g, dtype=torch.int32)
    for rank in (0, 1):
        table, local = half_remote_map(E, rank)
        got = local_expert_ids(ids, table, local, backend="triton")
        assert got.dtype == torch.int32 and got.shape == ids.shape
        assert got.tolist() == expected_local_ids(ids, table, local)
        assert torch.equal(got, reference.local_expert_ids(ids, table, local))


def test_local_expert_ids_reference_small():
    # Global 0..3: 1 → local 0, 3 → local 1; 2 maps to 5, past the 2 local experts.
    table = torch.tensor([-1, 0, 5, 1], dtype=torch.int32)
    ids = torch.tensor([[3, 0], [1, 2], [9, -1]], dtype=torch.int32)
    assert local_expert_ids(ids, table, 2).tolist() == [[1, -1], [0, -1], [-1, -1]]


def test_local_expert_ids_bad_arguments():
    ids = torch.zeros(2, 2, dtype=torch.int32)
    table = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(TypeError, match="topk_ids"):
        local_expert_ids(ids.long(), table, 2)
    with pytest.raises(TypeError, match="expert_map"):
        local_expert_ids(ids, table.long(), 2)
    with pytest.raises(ValueError, match="expert_map"):
        local_expert_ids(ids, torch.zeros(0, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="num_experts"):
        local_expert_ids(ids, table, 0)


@pytest.mark.gpu
def test_local_expert_ids_gpu():
    g = torch.Generator(device="cuda").manual_seed(5)
    ids = torch.randint(-1, 300, (4096, 8), generator=g, dtype=torch.int32, device="cuda")
    table, local = half_remote_map(256, 0, device="cuda")
    got = local_expert_ids(ids, table, local)
    assert torch.equal(got.cpu(), reference.local_expert_ids(ids.cpu(), table.cpu(), local))


@pytest.mark.gpu
@pytest.mark.parametrize("M,k,E,block_m", [(1, 8, 256, 16), (16384, 8, 256, 128)])
def test_expert_map_gpu(M, k, E, block_m):
    g = torch.Generator(device="cuda").manual_seed(M + E)
    ids = torch.randint(-1, E, (M, k), generator=g, dtype=torch.int32, device="cuda")
    table, local = half_remote_map(E, 1, device="cuda")
    plan = dispatch_plan(ids, local, block_m, expert_map=table)
    check_expert_map_plan(plan, ids, table, local)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [100, 4096], ids=["one launch", "count, scan, place launches"])
@pytest.mark.parametrize("mapped", [False, True], ids=["plain", "expert_map"])
def test_plan_cuda_graph_gpu(M, mapped):
    # The plan captured once and replayed on new ids equals the reference every time.
    k, E = 8, 64
    table, local = half_remote_map(E, 0, device="cuda") if mapped else (None, E)
    g = torch.Generator(device="cuda").manual_seed(M)
    ids = torch.randint(-1, E, (M, k), generator=g, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dispatch_plan(ids, local, 64, expert_map=table)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan = dispatch_plan(ids, local, 64, expert_map=table)
    for seed in (1, 2):
        g.manual_seed(seed)
        ids.copy_(torch.randint(-1, E + 2, ids.shape, generator=g, dtype=torch.int32,
                                device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.dispatch_plan(ids, local, 64, expert_map=table)
        for field in ("sorted_pairs", "block_experts", "expert_offsets", "pair_slots"):
            assert torch.equal(getattr(plan, field), getattr(expected, field)), field
