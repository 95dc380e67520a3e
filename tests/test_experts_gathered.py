"""The gathered experts path (`ExpertsConfig.gathered`): against the reference, bitwise
against the plan path at the same tiles, its counters, its edge cases and its errors."""

import dataclasses

import pytest
import torch

import moekit
from helpers import (
    REL_L2_TOL,
    assert_close,
    capture_cuda_graph,
    poison_,
    poison_cuda_cache,
    random_experts,
    random_routing,
    seeded_randn_like,
)
from moekit import reference
from moekit.bench.presets import PRESETS
from moekit.experts_gathered import launch_gathered_gemm1, launch_gathered_gemm2, row_steps_bound
from moekit.tuning import ExpertsConfig, GemmConfig
from moekit.tuning.tables import config_from_dict, config_to_dict
from test_experts import drop_some, run_case

GATHERED_TILES = ExpertsConfig(16, GemmConfig(16, 16, 1, 1, 1), GemmConfig(32, 16, 1, 1, 1),
                               gathered=True)
PLAN_TILES = dataclasses.replace(GATHERED_TILES, gathered=False)

def mostly_one_expert(ids):
    """Every tenth pair on expert 0, the rest on expert 1 (a token's slots may repeat it)."""
    return torch.where(torch.arange(ids.numel()).view(ids.shape) % 10 == 0, 0, 1).to(ids)


def strays_in_both_chunks(ids):
    """int64 ids of 80 pairs: exactly 64 valid pairs on expert 1 (pairs 0–64 less pair 5),
    one 64-row step, the rest on expert 0; pairs 5 and 66 (one in each chunk of 64 ids)
    hold 2**32 + 1, no expert but 1 if narrowed — which would push pair 64 out of the
    step — and pairs 70 and 71 hold −1."""
    flat = torch.zeros(ids.numel(), dtype=torch.int64)
    flat[:65] = 1
    flat[[5, 66]] = 2**32 + 1
    flat[[70, 71]] = -1
    return flat.view(ids.shape)


GATHERED_CASES = [
    # (M, E, k, H, I, activation, bias, dtype, extra, why)
    (8, 8, 2, 64, 32, "silu", False, torch.float32, {}, "decode: a few rows an expert"),
    (13, 6, 3, 96, 48, "swigluoai", True, torch.float16, {}, "gpt-oss act. + biases, fp16"),
    (9, 5, 1, 128, 64, "relu2", False, torch.float32, {}, "no gate; k = 1; E not a power of 2"),
    (10, 6, 2, 72, 40, "gelu", True, torch.float32, {},
     "H and I not multiples of the tiles; several K steps"),
    (12, 4, 2, 64, 32, "silu", True, torch.float32, {"ids_transform": drop_some},
     "−1 and sentinel ids contribute nothing, biases included"),
    (40, 8, 2, 64, 32, "silu", False, torch.float32,
     {"ids_transform": lambda ids: torch.full_like(ids, 3)},
     "all 80 pairs on one expert: five 16-row steps, five programs a column tile (and a "
     "token's two slots in one step)"),
    (12, 4, 1, 64, 32, "silu", False, torch.float32, {"weight_on_input": True},
     "router weight on the input (Llama-4)"),
    (40, 8, 2, 64, 32, "gelu", True, torch.float32,
     {"ids_transform": mostly_one_expert, "config": dataclasses.replace(
         GATHERED_TILES, block_m=64)},
     "64-row steps over 128 pairs, an expert's pairs ranked 64 ids at a time (`MATCH_MAX`); "
     "72 pairs on one expert: two steps, the first's ranks in both chunks"),
    (40, 8, 2, 64, 32, "silu", False, torch.float16,
     {"ids_transform": strays_in_both_chunks,
      "config": dataclasses.replace(GATHERED_TILES, block_m=64)},
     "int64 ids in the chunked ranking: -1 and 2**32 + 1 (no expert) in both chunks, and "
     "an expert's pairs filling its one step exactly"),
    (6, 40, 2, 64, 32, "silu", False, torch.float32, {},
     "more experts than pairs: the grid has M·k + M·k // 16 rows of programs"),
    (7, 4, 3, 64, 32, "gelu", False, torch.float16,
     {"ids_transform": lambda ids: ids.long().index_fill(0, torch.tensor([2]), 2**32 + 1)},
     "int64 ids read as they are; 2**32 + 1 is no expert (checked before narrowing)"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("M,E,k,H,I,activation,bias,dtype,extra,why", GATHERED_CASES)
def test_gathered_path_interpreter(M, E, k, H, I, activation, bias, dtype, extra, why):
    extra = {"config": GATHERED_TILES, **extra}
    out, expected = run_case(M, E, k, H, I, activation, bias=bias, dtype=dtype, **extra)
    assert_close(out, expected)


@pytest.mark.interpreter
@pytest.mark.parametrize("M,E,k,H,I,activation,bias,dtype,extra,why",
                         [GATHERED_CASES[i] for i in (1, 3, 4, 5)])
def test_gathered_path_equals_plan_path_interpreter(M, E, k, H, I, activation, bias, dtype,
                                                    extra, why):
    # The same K loops, epilogues and slot-order sums as the plan path: the same bits.
    gathered, _ = run_case(M, E, k, H, I, activation, bias=bias, dtype=dtype,
                           config=GATHERED_TILES, **extra)
    plan, _ = run_case(M, E, k, H, I, activation, bias=bias, dtype=dtype, config=PLAN_TILES,
                       **extra)
    assert torch.equal(gathered, plan)


@pytest.mark.interpreter
def test_gathered_gemm1_zeroes_the_counters_and_gemm2_counts_every_slot():
    # The counters come from torch.empty: GEMM1 must zero them all (with fewer programs
    # than counters each zeroes a strided share), or no token's last slot is recognised
    # and its row stays unwritten; GEMM2 then leaves each at the token's valid slots.
    M, E, k, H, I = 20, 2, 1, 1536, 32
    w13, w2, _, _ = random_experts(E, H, I, gated=True, bias=False, dtype=torch.float32)
    hidden = torch.randn(M, H, generator=torch.Generator().manual_seed(3))
    ids, weights = random_routing(M, E, k, seed=3)
    ids[2, 0] = -1
    tiles = GATHERED_TILES.as_ints()
    arrivals = torch.full((M, H // 32), 7, dtype=torch.int32)
    assert row_steps_bound(M, k, E, 16) * (I // 16) * 128 < arrivals.numel()
    inter = launch_gathered_gemm1(hidden, w13, None, ids, weights, "silu", 1.0, 0.0, False, 16,
                                  tiles[1:6], arrivals)
    assert torch.equal(arrivals, torch.zeros_like(arrivals))
    out = poison_(torch.empty_like(hidden))
    launch_gathered_gemm2(inter, w2, None, ids, weights, True, 16, tiles[6:11], out, arrivals)
    expected = reference.fused_experts(hidden.double(), w13.double(), w2.double(), ids, weights)
    assert_close(out, expected)
    valid = (ids >= 0).sum(1, dtype=torch.int32)
    assert torch.equal(arrivals, valid[:, None].expand_as(arrivals))


@pytest.mark.interpreter
def test_gathered_path_unrouted_tokens_give_zero_rows():
    # No program stores or sums a row for a token without a valid slot: GEMM2 zeroes it.
    out, expected = run_case(
        7, 4, 2, 64, 32, "silu", config=GATHERED_TILES,
        ids_transform=lambda ids: ids.index_fill(0, torch.tensor([1, 6]), -1))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[6], torch.zeros_like(out[6]))
    assert_close(out, expected)


@pytest.mark.interpreter
def test_gathered_path_every_pair_dropped_gives_zeros():
    out, expected = run_case(10, 4, 2, 64, 32, "silu", bias=True, config=GATHERED_TILES,
                             ids_transform=lambda ids: torch.full_like(ids, -1))
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(expected, torch.zeros_like(expected))


def test_row_steps_bound_covers_every_routing():
    # Σ_e ceil(count_e / block_m) over the experts hit never passes the grid's rows.
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        m, k, e = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (65, 9, 129))
        block_m = 2 ** int(torch.randint(4, 7, (1,), generator=g))
        ids = torch.randint(0, e, (m * k,), generator=g)
        if torch.rand(1, generator=g) < 0.3:  # skewed: most pairs on a few experts
            ids = ids % max(1, e // 16)
        counts = torch.bincount(ids, minlength=e)
        steps = int(((counts + block_m - 1) // block_m).sum())
        assert steps <= row_steps_bound(m, k, e, block_m), (m, k, e, block_m)


def test_gathered_config_checks_and_round_trip():
    tiles = GemmConfig(32, 32)
    with pytest.raises(ValueError, match="gathered"):
        ExpertsConfig(1, tiles, tiles, gathered=True)
    with pytest.raises(ValueError, match="gathered"):
        ExpertsConfig(32, tiles, tiles, tail_block_m=16, gathered=True)
    config = ExpertsConfig(32, tiles, tiles, gathered=True)
    assert config.as_ints()[-1] == 1 and PLAN_TILES.as_ints()[-1] == 0
    assert config_from_dict(config_to_dict(config)) == config
    assert "gathered" not in config_to_dict(PLAN_TILES)


def gpu_gathered_tiles(block_m: int) -> ExpertsConfig:
    """The heuristic's decode tiles for block_m, gathered."""
    return ExpertsConfig(block_m, GemmConfig(64, 64, 8, 4, 4), GemmConfig(64, 64, 8, 4, 4),
                         gathered=True)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", list(PRESETS))
def test_gathered_path_gpu(preset):
    # bf16 at decode token counts against the reference and bitwise against the plan
    # path at the same tiles; skewed routing puts more rows on an expert than one step.
    p = PRESETS[preset]
    E, k, H, I = p.num_experts, p.top_k, p.hidden, p.inter
    w13, w2, b13, b2 = random_experts(E, H, I, bias=p.bias, dtype=torch.bfloat16, device="cuda")
    f32 = lambda t: None if t is None else t.float()
    for M, skew, block_m in ((8, 0.0, 16), (16, 0.0, 16), (64, 0.0, 32), (64, 4.0, 16)):
        hidden = seeded_randn_like(torch.empty(M, H, device="cuda", dtype=torch.bfloat16), M)
        ids, weights = random_routing(M, E, k, skew=skew, device="cuda", seed=M)
        config = gpu_gathered_tiles(block_m)

        def run(c, hidden=hidden, ids=ids, weights=weights):
            return moekit.fused_experts(hidden, w13, w2, ids, weights, activation=p.activation,
                                        b13=b13, b2=b2, config=c,
                                        out=poison_(torch.empty_like(hidden)))
        poison_cuda_cache()
        out = run(config)
        expected = reference.fused_experts(hidden.float(), w13, w2, ids, weights,
                                           activation=p.activation, b13=f32(b13), b2=f32(b2))
        where = f"{preset} M={M} skew={skew}"
        assert_close(out, expected.float(), REL_L2_TOL[torch.bfloat16], where)
        assert torch.equal(out, run(dataclasses.replace(config, gathered=False))), where
        for _ in range(5):  # programs race to finish a token: the sum must not care
            assert torch.equal(out, run(config)), where


@pytest.mark.gpu
def test_gathered_path_cuda_graph_replay_gpu():
    # Replayed on new inputs (the counters zeroed by the replayed GEMM1 each time): bitwise
    # equal to an eager call on the same inputs.
    E, k, H, I = 64, 8, 1024, 512
    w13, w2, _, _ = random_experts(E, H, I, dtype=torch.bfloat16, device="cuda")
    hidden = seeded_randn_like(torch.empty(16, H, device="cuda", dtype=torch.bfloat16), 0)
    ids, weights = random_routing(16, E, k, device="cuda")
    config = gpu_gathered_tiles(16)
    call = lambda: moekit.fused_experts(hidden, w13, w2, ids, weights, config=config)
    graph, out = capture_cuda_graph(call)
    for seed in (1, 2):
        new_ids, new_weights = random_routing(16, E, k, device="cuda", seed=seed, skew=2.0 * seed)
        hidden.copy_(seeded_randn_like(hidden, seed))
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        out.fill_(float("nan"))
        graph.replay()
        eager = moekit.fused_experts(hidden, w13, w2, ids, weights, config=config,
                                     out=poison_(torch.empty_like(hidden)))
        assert torch.equal(out, eager), f"replay {seed}"
        assert_close(out, reference.fused_experts(hidden.float(), w13, w2, ids, weights).float(),
                     REL_L2_TOL[torch.bfloat16], f"replay {seed}")


def test_gathered_where_asked(monkeypatch):
    # MOEKIT_GATHERED=1 (a measurement control) moves plan-path tiles without tail tiles,
    # at decode batch sizes, to the gathered path; everything else stays as chosen.
    from moekit.tuning import heuristic

    tiles = GemmConfig(32, 32)
    plan = ExpertsConfig(16, tiles, tiles)
    direct = ExpertsConfig(1, tiles, tiles)
    tails = ExpertsConfig(128, tiles, tiles, tail_block_m=64)
    assert heuristic.gathered_where_asked(plan, 8, 8) == plan, "off by default"
    monkeypatch.setattr(heuristic, "GATHERED", True)
    assert heuristic.gathered_where_asked(plan, 64, 8) == dataclasses.replace(plan,
                                                                               gathered=True)
    for config, m, k in ((plan, 65, 8), (direct, 2, 8), (tails, 8, 8)):
        assert heuristic.gathered_where_asked(config, m, k) == config


@pytest.mark.interpreter
def test_gathered_control_reaches_the_launch(monkeypatch):
    import moekit.experts

    monkeypatch.setattr("moekit.tuning.heuristic.GATHERED", True)
    taken = []
    launch = moekit.experts.launch_gathered_experts
    monkeypatch.setattr(moekit.experts, "launch_gathered_experts",
                        lambda *args: taken.append(args[-2]) or launch(*args))
    out, expected = run_case(6, 8, 2, 64, 32, "silu")
    assert len(taken) == 1 and taken[0][12] == 1
    assert_close(out, expected)
