"""permute/unpermute over the plan's grouped layout: exact copies, fp32 sums, the contract.

permute is a copy, so it is compared bit for bit (scales included); unpermute is a
weighted sum, compared with the reference within fp32 tolerance. Outputs start
poisoned (NaN), so an unwritten element shows; padding and dropped pairs are poisoned
on the input side, so a kernel that reads them shows too.
"""

import pytest
import torch

from helpers import assert_close, poison_
from moekit import reference
from moekit.dispatch import dispatch_plan
from moekit.dispatch_plan import DispatchPlan
from moekit.permute import (
    permute,
    permute_row_config,
    row_config,
    run_permute,
    run_unpermute,
    unpermute,
)

BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32}


def bits(t):
    return t.view(BITS[t.element_size()])


def make_case(M, k, E, H, dtype, *, drop=0.0, one_expert=False, device="cpu", seed=0):
    """Routing with `drop` of the pairs sent to −1 or a sentinel ≥ E, and rows to move."""
    g = torch.Generator(device=device).manual_seed(seed + 7 * M + E)
    ids = torch.randint(0, E, (M, k), generator=g, device=device, dtype=torch.int32)
    if one_expert:
        ids.fill_(E - 1)
    if drop:
        coin = torch.rand((M, k), generator=g, device=device)
        ids = torch.where(coin < drop / 2, -1, ids)
        ids = torch.where((coin >= drop / 2) & (coin < drop), E + 3, ids)
    weights = torch.rand((M, k), generator=g, device=device)
    hidden = torch.randn((M, H), generator=g, device=device).to(dtype)
    return ids, weights, hidden


def make_scales(kind, M, H, device="cpu"):
    if kind is None:
        return None
    g = torch.Generator(device=device).manual_seed(M + H)
    shape = (M,) if kind == "row" else (M, -(-H // 32))
    return torch.rand(shape, generator=g, device=device) + 0.5


def check_permute(hidden, plan, k, scales, **kw):
    """Run permute into poisoned buffers; compare the used slots bitwise, tail untouched."""
    capacity, H = plan.capacity, hidden.shape[1]
    out = poison_(torch.empty((capacity, H), dtype=hidden.dtype, device=hidden.device))
    out_scales = None
    if scales is not None:
        out_scales = poison_(torch.empty((capacity, *scales.shape[1:]), device=hidden.device))
    grouped, grouped_scales = permute(hidden, plan, top_k=k, row_scales=scales, out=out,
                                      out_scales=out_scales, **kw)
    assert grouped is out and grouped_scales is out_scales
    expected, expected_scales = reference.permute(hidden, plan, top_k=k, row_scales=scales)
    used = int(plan.expert_offsets[-1])
    assert torch.equal(bits(grouped[:used]), bits(expected[:used])), "rows differ"
    # The tail past the last run is no block's: permute leaves it alone.
    assert grouped[used:].float().isnan().all(), "the unused tail was written"
    if scales is not None:
        assert torch.equal(grouped_scales[:used], expected_scales[:used]), "scales differ"
        assert grouped_scales[used:].isnan().all()
    return grouped


def poison_unused_rows(grouped, plan):
    """NaN in every row no pair occupies (padding and tail): unpermute must not read them."""
    grouped = grouped.clone()
    grouped[plan.sorted_pairs.long() >= plan.num_pairs] = float("nan")
    return grouped


def identity_combine(hidden, ids, weights, num_experts, expert_map=None):
    """What unpermute(permute(hidden)) must give: hidden[m] · Σ of the weights of kept pairs."""
    local = ids.long()
    if expert_map is not None:
        known = (local >= 0) & (local < expert_map.numel())
        local = torch.where(known, expert_map.long()[local.clamp(0, expert_map.numel() - 1)], -1)
    kept = (local >= 0) & (local < num_experts)
    return hidden.float() * torch.where(kept, weights, 0.0).sum(1, keepdim=True)


CASES = [
    # (M, k, E, block_m, H, dtype, scales, drop, why)
    (1, 1, 1, 16, 64, torch.float16, None, 0.0, "one token, one expert: 15 padding rows"),
    (37, 2, 6, 16, 200, torch.float16, "row", 0.3,
     "E not a power of two, H not a multiple of the block, dropped ids, per-row scales"),
    (24, 3, 8, 32, 96, torch.float32, "group", 0.0, "fp32 rows, per-group scales [M, G]"),
    (20, 3, 5, 16, 64, torch.float16, None, 0.0, "all tokens on one expert"),
    (16, 2, 4, 16, 128, torch.float8_e4m3fn, "group", 0.2, "fp8 rows move bit for bit"),
    (6, 4, 3, 16, 1032, torch.float16, None, 0.5, "several H tiles, the last one partial"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("M,k,E,block_m,H,dtype,scales,drop,why", CASES)
def test_permute_unpermute_interpreter(M, k, E, block_m, H, dtype, scales, drop, why):
    ids, weights, hidden = make_case(M, k, E, H, dtype, drop=drop,
                                     one_expert=why == "all tokens on one expert")
    plan = dispatch_plan(ids, E, block_m, backend="triton")
    row_scales = make_scales(scales, M, H)
    grouped = check_permute(hidden, plan, k, row_scales, backend="triton")
    if dtype not in (torch.float16, torch.float32):
        return  # fp8 rows are not summed by unpermute
    grouped = poison_unused_rows(grouped, plan)
    # A dropped pair's weight is never read: NaN there must not reach the output.
    weights = torch.where(plan.pair_slots.view(M, k) < 0, float("nan"), weights)
    out = poison_(torch.empty((M, H), dtype=dtype))
    result = unpermute(grouped, plan, weights, out=out, backend="triton")
    assert result is out
    assert_close(out, reference.unpermute(grouped, plan, weights), tol=1e-5, name="unpermute")
    # permute then unpermute with identity experts scales each row by its kept weights.
    weights = torch.nan_to_num(weights)
    assert_close(unpermute(grouped, plan, weights, backend="triton"),
                 identity_combine(hidden, ids, weights, E).to(dtype), name="round trip")


@pytest.mark.interpreter
def test_expert_map_half_remote_interpreter():
    # Rank 0 of two holds the even global experts (local ids 0..3); odd ones are remote.
    M, k, E_global, H = 12, 4, 8, 48
    ids, weights, hidden = make_case(M, k, E_global, H, torch.float16, drop=0.2)
    table = torch.full((E_global,), -1, dtype=torch.int32)
    table[0::2] = torch.arange(E_global // 2, dtype=torch.int32)
    plan = dispatch_plan(ids, E_global // 2, 16, expert_map=table, backend="triton")
    grouped = check_permute(hidden, plan, k, None, backend="triton")
    real = plan.sorted_pairs.long()
    real = real[real < plan.num_pairs]
    assert (ids.view(-1)[real] % 2 == 0).all(), "only local experts' rows are moved"
    out = unpermute(poison_unused_rows(grouped, plan), plan, weights, backend="triton")
    assert_close(out, identity_combine(hidden, ids, weights, E_global // 2, table).half())


@pytest.mark.interpreter
def test_no_tokens_interpreter():
    # M = 0: empty plan, empty outputs, no launch.
    ids = torch.empty((0, 2), dtype=torch.int32)
    plan = dispatch_plan(ids, 4, 16, backend="triton")
    grouped, scales = permute(torch.empty((0, 32), dtype=torch.float16), plan, top_k=2,
                              row_scales=torch.empty(0), backend="triton")
    assert grouped.shape == (0, 32) and scales.shape == (0,)
    out = unpermute(grouped, plan, torch.empty((0, 2)), backend="triton")
    assert out.shape == (0, 32)


CONFIGS = [
    # (BLOCK_H, ROWS, num_warps, why)
    (64, 2, 1, "two tokens per program, M odd: the last program is half empty"),
    (32, 4, 2, "four tokens per program, several H tiles, the last one partial"),
    (256, 1, 4, "one tile wider than the row: masked columns"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("block_h,rows,warps,why", CONFIGS)
def test_explicit_configs_interpreter(block_h, rows, warps, why):
    # The sweep's candidate configs must all be correct, not only the heuristic's.
    M, k, E, H = 13, 3, 5, 100
    ids, weights, hidden = make_case(M, k, E, H, torch.float16, drop=0.2)
    plan = dispatch_plan(ids, E, 16, backend="triton")
    scales = make_scales("group", M, H)
    config = {"BLOCK_H": block_h, "ROWS": rows, "num_warps": warps}
    grouped = poison_(torch.empty((plan.capacity, H), dtype=torch.float16))
    grouped_scales = poison_(torch.empty((plan.capacity, scales.shape[1])))
    run_permute(hidden, plan.sorted_pairs, plan.expert_offsets, plan.pair_slots, scales, k, 16,
                grouped, grouped_scales, config)
    expected, expected_scales = reference.permute(hidden, plan, top_k=k, row_scales=scales)
    used = int(plan.expert_offsets[-1])
    assert torch.equal(bits(grouped[:used]), bits(expected[:used])), "rows differ"
    assert torch.equal(grouped_scales[:used], expected_scales[:used]), "scales differ"
    assert grouped[used:].isnan().all(), "the unused tail was written"
    out = poison_(torch.empty((M, H), dtype=torch.float16))
    run_unpermute(poison_unused_rows(grouped, plan), plan.pair_slots, weights, out, config)
    assert_close(out, reference.unpermute(grouped, plan, weights), tol=1e-5)


@pytest.mark.parametrize("M", [1, 64, 4096, 16384])
@pytest.mark.parametrize("H,elem", [(7168, 2), (2880, 2), (1536, 2), (2048, 1), (64, 4)])
@pytest.mark.parametrize("config_of", [row_config, permute_row_config])
def test_row_config_moves_whole_vectors(M, H, elem, config_of):
    # Every thread holds whole 16-byte vectors (unless the row is narrower than one warp
    # of them), and a tile stays within 8 KB.
    cfg = config_of(M, H, elem)
    vec = 16 // elem
    per_thread = cfg["ROWS"] * cfg["BLOCK_H"] // (32 * cfg["num_warps"])
    if cfg["ROWS"] * cfg["BLOCK_H"] >= 32 * vec:
        assert per_thread >= vec and per_thread % vec == 0, cfg
    assert cfg["ROWS"] * cfg["BLOCK_H"] * elem <= 8192 or cfg["BLOCK_H"] == vec, cfg


def test_reference_backend_matches_reference():
    # backend="reference" writes the reference into the caller's buffers (CPU default).
    ids, weights, hidden = make_case(9, 2, 3, 40, torch.float32, drop=0.3)
    plan = reference.dispatch_plan(ids, 3, 16)
    grouped, scales = permute(hidden, plan, top_k=2, row_scales=torch.rand(9))
    assert torch.equal(grouped, reference.permute(hidden, plan, top_k=2)[0])
    assert torch.equal(unpermute(grouped, plan, weights),
                       reference.unpermute(grouped, plan, weights))


def test_reference_small_by_hand():
    # Pairs: token 0 → experts (1, 0); token 1 → (1, dropped). block_m 16.
    ids = torch.tensor([[1, 0], [1, -1]], dtype=torch.int32)
    plan = reference.dispatch_plan(ids, 2, 16)
    assert plan.pair_slots.tolist() == [16, 0, 17, -1]
    hidden = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    grouped, _ = reference.permute(hidden, plan, top_k=2)
    assert grouped[0].tolist() == [1.0, 2.0] and grouped[16:18].tolist() == [[1, 2], [3, 4]]
    assert grouped[1:16].abs().sum() == 0 and grouped[18:].abs().sum() == 0
    weights = torch.tensor([[0.5, 0.25], [2.0, float("nan")]])
    out = reference.unpermute(grouped * 10, plan, weights)
    assert out.tolist() == [[7.5, 15.0], [60.0, 80.0]]


def test_bad_arguments():
    ids = torch.zeros(2, 2, dtype=torch.int32)
    plan = reference.dispatch_plan(ids, 2, 16)
    hidden = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="top_k"):
        permute(hidden, plan, top_k=3)
    with pytest.raises(TypeError, match="plan"):
        permute(hidden, (plan.sorted_pairs,), top_k=2)
    with pytest.raises(ValueError, match="row_scales"):
        permute(hidden, plan, top_k=2, row_scales=torch.ones(3))
    with pytest.raises(ValueError, match="out"):
        permute(hidden, plan, top_k=2, out=torch.empty(plan.capacity + 1, 8))
    grouped = torch.zeros(plan.capacity, 8)
    with pytest.raises(ValueError, match="topk_weights"):
        unpermute(grouped, plan, torch.ones(2, 3))
    with pytest.raises(ValueError, match="grouped"):
        unpermute(grouped[1:], plan, torch.ones(2, 2))
    with pytest.raises(ValueError, match="pair_slots"):
        unpermute(grouped, DispatchPlan(*plan[:5]), torch.ones(2, 2))
    with pytest.raises(ValueError, match="pair_slots"):
        permute(hidden, DispatchPlan(*plan[:5]), top_k=2)


# --------------------------------------------------------------------------------- GPU

GPU_CASES = [
    # (M, k, E, block_m, H, why)
    (1, 8, 256, 16, 7168, "decode: 8 of 256 experts, mostly padding"),
    (333, 6, 60, 64, 2880, "E not a power of two, H = 2880 (not a multiple of the tile)"),
    (4096, 8, 128, 128, 7168, "prefill"),
    # Large: GBs with the reference; in the slow stage, which runs alone, so a parallel
    # worker's big test cannot starve them (each once ran out of memory beside one; the
    # first in session 33, beside a worker holding 80 GB).
    pytest.param(16384, 8, 256, 128, 7168, "DeepSeek-V3 prefill: 2.3 GB of grouped rows",
                 marks=pytest.mark.slow),
    pytest.param(16384, 8, 256, 128, 16384, "capacity·H > 2^31 elements: 64-bit row offsets",
                 marks=pytest.mark.slow),
]


@pytest.mark.gpu
@pytest.mark.parametrize("M,k,E,block_m,H,why", GPU_CASES)
def test_permute_unpermute_gpu(M, k, E, block_m, H, why):
    ids, weights, hidden = make_case(M, k, E, H, torch.bfloat16, drop=0.05, device="cuda")
    plan = dispatch_plan(ids, E, block_m)
    scales = make_scales("group", M, H, device="cuda")
    grouped = check_permute(hidden, plan, k, scales)
    grouped = poison_unused_rows(grouped, plan)
    out = poison_(torch.empty((M, H), dtype=torch.bfloat16, device="cuda"))
    unpermute(grouped, plan, weights, out=out)
    assert_close(out, reference.unpermute(grouped, plan, weights), tol=1e-3)
    del grouped
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_expert_map_gpu():
    M, k, E_global, H = 4096, 8, 256, 7168
    ids, weights, hidden = make_case(M, k, E_global, H, torch.bfloat16, device="cuda")
    table = torch.full((E_global,), -1, dtype=torch.int32)
    table[1::2] = torch.arange(E_global // 2, dtype=torch.int32)
    table = table.cuda()
    plan = dispatch_plan(ids, E_global // 2, 64, expert_map=table)
    grouped = check_permute(hidden, plan, k, None)
    out = unpermute(poison_unused_rows(grouped, plan), plan, weights)
    expected = identity_combine(hidden, ids, weights, E_global // 2, table)
    assert_close(out, expected.to(torch.bfloat16))


@pytest.mark.gpu
def test_cuda_graph_gpu():
    # Plan, permute and unpermute captured once and replayed on new routing in place.
    M, k, E, H = 256, 8, 64, 2048
    ids, weights, hidden = make_case(M, k, E, H, torch.bfloat16, device="cuda")

    def step():
        plan = dispatch_plan(ids, E, 64)
        grouped, _ = permute(hidden, plan, top_k=k)
        return unpermute(grouped, plan, weights)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up off the capture stream
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in (1, 2):
        new_ids, new_weights, new_hidden = make_case(M, k, E, H, torch.bfloat16, drop=0.1,
                                                     device="cuda", seed=seed)
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        hidden.copy_(new_hidden)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, step()), "replay differs from an eager call"
        assert_close(out, identity_combine(hidden, ids, weights, E).to(torch.bfloat16))


@pytest.mark.gpu
def test_cuda_graph_routing_to_combine_with_expert_map_gpu():
    # The whole expert-parallel path in one graph: route → plan through an expert_map →
    # permute with per-group scales → unpermute; replayed on new logits and rows.
    from moekit.routing import route

    M, E_global, k, H = 300, 64, 6, 2880
    table = torch.full((E_global,), -1, dtype=torch.int32)
    table[1::2] = torch.arange(E_global // 2, dtype=torch.int32)
    table = table.cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn((M, E_global), generator=g, device="cuda")
    hidden = torch.randn((M, H), generator=g, device="cuda").to(torch.bfloat16)
    scales = make_scales("group", M, H, device="cuda")

    def step():
        topk = route(logits, k)
        plan = dispatch_plan(topk.ids, E_global // 2, 32, expert_map=table)
        grouped, grouped_scales = permute(hidden, plan, top_k=k, row_scales=scales)
        return topk, plan, grouped, grouped_scales, unpermute(grouped, plan, topk.weights)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up off the capture stream
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        topk, plan, grouped, grouped_scales, out = step()
    for seed in (1, 2):
        g.manual_seed(seed)
        logits.copy_(torch.randn(logits.shape, generator=g, device="cuda"))
        hidden.copy_(torch.randn(hidden.shape, generator=g, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        expected_topk = reference.route(logits, k)
        assert torch.equal(topk.ids, expected_topk.ids)
        check_expert_map_fields(plan, topk.ids, table, E_global // 2)
        used = int(plan.expert_offsets[-1])
        ref, ref_scales = reference.permute(hidden, plan, top_k=k, row_scales=scales)
        assert torch.equal(bits(grouped[:used]), bits(ref[:used]))
        assert torch.equal(grouped_scales[:used], ref_scales[:used])
        expected = identity_combine(hidden, topk.ids, topk.weights, E_global // 2, table)
        assert_close(out, expected.to(torch.bfloat16))


def check_expert_map_fields(plan, ids, table, local_experts):
    """The replayed plan equals the reference plan of the same ids through the map."""
    expected = reference.dispatch_plan(ids, local_experts, plan.block_m, expert_map=table)
    for field in ("sorted_pairs", "block_experts", "expert_offsets", "pair_slots"):
        assert torch.equal(getattr(plan, field), getattr(expected, field)), field


GPU_CONFIGS = [
    # (BLOCK_H, ROWS, num_warps): the sweep's candidates, so any default it picks is correct
    (4096, 1, 8), (4096, 2, 8), (2048, 4, 8), (1024, 1, 4), (1024, 2, 4), (1024, 4, 8),
    (512, 4, 4),
]


@pytest.mark.gpu
@pytest.mark.parametrize("block_h,rows,warps", GPU_CONFIGS)
def test_explicit_configs_gpu(block_h, rows, warps):
    # H = 2880 is not a multiple of any tile; M = 4095 leaves the last program part-empty.
    M, k, E, H, block_m = 4095, 4, 128, 2880, 128
    ids, weights, hidden = make_case(M, k, E, H, torch.bfloat16, drop=0.05, device="cuda")
    plan = dispatch_plan(ids, E, block_m)
    config = {"BLOCK_H": block_h, "ROWS": rows, "num_warps": warps}
    grouped = poison_(torch.empty((plan.capacity, H), dtype=torch.bfloat16, device="cuda"))
    run_permute(hidden, plan.sorted_pairs, plan.expert_offsets, plan.pair_slots, None, k,
                block_m, grouped, None, config)
    expected, _ = reference.permute(hidden, plan, top_k=k)
    used = int(plan.expert_offsets[-1])
    assert torch.equal(bits(grouped[:used]), bits(expected[:used]))
    assert grouped[used:].float().isnan().all()
    out = poison_(torch.empty((M, H), dtype=torch.bfloat16, device="cuda"))
    run_unpermute(poison_unused_rows(grouped, plan), plan.pair_slots, weights, out, config)
    assert_close(out, reference.unpermute(grouped, plan, weights), tol=1e-3)
