"""fused_experts: the Triton pipeline against the reference, its edge cases and errors."""

import dataclasses

import pytest
import torch

import moekit
from helpers import (
    DEEPSEEK_LIKE,
    REL_L2_TOL,
    assert_close,
    capture_cuda_graph,
    exact_counts,
    poison_,
    poison_cuda_cache,
    random_experts,
    random_routing,
    seeded_randn_like,
)
from moekit import reference
from moekit.bench.presets import PRESETS
from moekit.routing import Routing
from moekit.tuning import ExpertsConfig, GemmConfig
from moekit.tuning.heuristic import tiles_for_block_m


def run_case(M, E, k, H, I, activation, *, bias=False, dtype=torch.float32, device="cpu",
             skew=0.0, weight_on_input=False, ids_transform=None, config=None, seed=0):
    """Run the Triton path with a poisoned output and compare with the float64 reference."""
    gated = activation != "relu2"
    w13, w2, b13, b2 = random_experts(E, H, I, gated=gated, bias=bias, dtype=dtype,
                                      device=device, seed=seed)
    g = torch.Generator(device=device).manual_seed(seed + 7)
    hidden = torch.randn(M, H, generator=g, device=device).to(dtype)
    ids, weights = random_routing(M, E, k, skew=skew, device=device, seed=seed)
    if ids_transform is not None:
        ids = ids_transform(ids)
    out = poison_(torch.empty_like(hidden))
    if device == "cuda":
        poison_cuda_cache()
    result = moekit.fused_experts(
        hidden, w13, w2, ids, weights, activation=activation, b13=b13, b2=b2,
        apply_router_weight_on_input=weight_on_input, config=config, out=out, backend="triton",
    )
    assert result is out
    f64 = lambda t: None if t is None else t.double()
    expected = reference.fused_experts(
        f64(hidden), f64(w13), f64(w2), ids, weights, activation=activation, b13=f64(b13),
        b2=f64(b2), apply_router_weight_on_input=weight_on_input,
    )
    return out, expected


def drop_some(ids):
    """Mark every third slot as 'no expert' (−1) and one as an EP sentinel (≥ E)."""
    ids = ids.clone()
    ids.view(-1)[::3] = -1
    ids.view(-1)[1] = 10_000
    return ids


SMALL_TILES = ExpertsConfig(16, GemmConfig(16, 16, 2, 1, 1), GemmConfig(32, 16, 1, 1, 1))

INTERPRETER_CASES = [
    # (M, E, k, H, I, activation, bias, dtype, extra, why)
    (5, 4, 2, 64, 32, "silu", False, torch.float32, {}, "basic SwiGLU"),
    (33, 8, 3, 96, 48, "swigluoai", True, torch.float16, {}, "gpt-oss act. + biases, fp16"),
    (1, 3, 1, 128, 64, "relu2", False, torch.float32, {}, "no gate; one token; k = 1"),
    (20, 6, 2, 64, 40, "gelu", True, torch.float32, {}, "I not a multiple of the tile"),
    (20, 6, 2, 64, 40, "gelu_tanh", False, torch.float16, {}, "tanh GELU"),
    (17, 5, 2, 72, 24, "silu", False, torch.float32, {"config": SMALL_TILES},
     "H and I not multiples of block_k; E not a power of two; several K steps"),
    (24, 4, 2, 64, 32, "silu", False, torch.float32, {"ids_transform": drop_some},
     "−1 and sentinel ids contribute nothing"),
    (30, 8, 2, 64, 32, "silu", False, torch.float32,
     {"ids_transform": lambda ids: torch.full_like(ids, 3)}, "all tokens on one expert"),
    (12, 4, 1, 64, 32, "silu", False, torch.float32, {"weight_on_input": True},
     "router weight on the input (Llama-4)"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("M,E,k,H,I,activation,bias,dtype,extra,why", INTERPRETER_CASES)
def test_matches_reference_interpreter(M, E, k, H, I, activation, bias, dtype, extra, why):
    out, expected = run_case(M, E, k, H, I, activation, bias=bias, dtype=dtype, **extra)
    assert_close(out, expected)


TMA_TILES = ExpertsConfig(128, GemmConfig(32, 32, 2, 4, 2), GemmConfig(32, 32, 2, 4, 2))

TMA_CASES = [
    # (M, E, k, H, I, activation, bias, extra, why)
    (150, 5, 2, 72, 40, "swigluoai", True, {}, "biases; H and I not multiples of the tiles"),
    (90, 4, 2, 64, 48, "relu2", False, {}, "no gate: the w13 view has I rows per expert"),
    (70, 3, 1, 64, 32, "silu", False, {"weight_on_input": True}, "router weight on input"),
    (64, 6, 2, 64, 32, "silu", False, {"ids_transform": drop_some}, "dropped and sentinel ids"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("M,E,k,H,I,activation,bias,extra,why", TMA_CASES)
def test_tma_path_interpreter(monkeypatch, M, E, k, H, I, activation, bias, extra, why):
    # The Hopper path (TMA descriptors, persistent GEMM2) run by the interpreter, which
    # implements descriptors: the test pretends the CPU has TMA.
    monkeypatch.setattr("moekit._tma.device_has_tma", lambda device: True)
    assert moekit.experts.use_tma(torch.empty(1, H, dtype=torch.float16),
                                  torch.empty(E, 2 * I, H, dtype=torch.float16),
                                  torch.empty(E, H, I, dtype=torch.float16), 128)
    out, expected = run_case(M, E, k, H, I, activation, bias=bias, dtype=torch.float16,
                             config=TMA_TILES, **extra)
    assert_close(out, expected)


TAIL_TILES = ExpertsConfig(32, GemmConfig(16, 16, 2, 1, 1), GemmConfig(32, 16, 1, 1, 1),
                           tail_block_m=16)
TAIL_TMA_TILES = ExpertsConfig(128, GemmConfig(32, 32, 2, 4, 2), GemmConfig(32, 32, 2, 4, 2),
                               tail_block_m=64)

TAIL_CASES = [
    # (M, E, k, H, I, activation, bias, dtype, config, extra, why)
    (97, 5, 1, 48, 40, "silu", False, torch.float32, TAIL_TILES,
     {"ids_transform": exact_counts([0, 16, 33, 48, 0])},
     "runs of 0, 1, 3 and 3 blocks: empty, tail only, pair + tail, pair + full tail"),
    (60, 4, 2, 64, 32, "swigluoai", True, torch.float16, TAIL_TILES, {"skew": 2.0},
     "random skewed routing, biases, fp16"),
    (40, 6, 2, 64, 24, "relu2", False, torch.float32, TAIL_TILES,
     {"ids_transform": drop_some}, "no gate; dropped and sentinel ids"),
    (36, 3, 2, 64, 32, "silu", False, torch.float32, TAIL_TILES, {"weight_on_input": True},
     "router weight on the input"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("M,E,k,H,I,activation,bias,dtype,config,extra,why", TAIL_CASES)
def test_tail_tiles_interpreter(M, E, k, H, I, activation, bias, dtype, config, extra, why):
    # Each expert's run in pairs of plan blocks plus its odd last block: every row written
    # exactly as the reference says, whatever the run lengths.
    out, expected = run_case(M, E, k, H, I, activation, bias=bias, dtype=dtype,
                             config=config, **extra)
    assert_close(out, expected)


@pytest.mark.interpreter
@pytest.mark.parametrize("counts", [[200, 130, 0], [130, 200, 0], [60, 70, 200]])
def test_tail_tiles_on_the_tma_path_interpreter(monkeypatch, counts):
    # GEMM1 at both heights with TMA weight tiles; the persistent GEMM2 computes a tail at
    # full height and must store only its own 64 rows, not the next run's first block.
    monkeypatch.setattr("moekit._tma.device_has_tma", lambda device: True)
    out, expected = run_case(sum(counts), 3, 1, 64, 32, "silu", bias=True,
                             dtype=torch.float16, config=TAIL_TMA_TILES,
                             ids_transform=exact_counts(counts))
    assert_close(out, expected)


DIRECT_TILES = ExpertsConfig(1, GemmConfig(16, 32, 1, 1, 1), GemmConfig(16, 16, 8, 1, 1))

DIRECT_CASES = [
    # (M, E, k, H, I, activation, bias, dtype, extra, why)
    (1, 8, 3, 64, 32, "silu", False, torch.float32, {}, "one token: the decode shape"),
    (5, 4, 2, 96, 48, "swigluoai", True, torch.float16, {},
     "tokens sharing experts; gpt-oss act. + biases, fp16"),
    (3, 3, 1, 128, 64, "relu2", False, torch.float32, {}, "no gate; k = 1"),
    (4, 6, 2, 72, 40, "gelu", True, torch.float32, {},
     "H and I not multiples of block_n / block_k; several K steps"),
    (6, 4, 2, 64, 32, "silu", True, torch.float32, {"ids_transform": drop_some},
     "−1 and sentinel ids contribute nothing, biases included"),
    (4, 4, 2, 64, 32, "silu", True, torch.float32, {"weight_on_input": True},
     "router weight on the input: GEMM2 sums unweighted"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("M,E,k,H,I,activation,bias,dtype,extra,why", DIRECT_CASES)
def test_direct_path_interpreter(M, E, k, H, I, activation, bias, dtype, extra, why):
    # No plan, one pair (GEMM1) or one token (GEMM2) per program, the combine fused in.
    out, expected = run_case(M, E, k, H, I, activation, bias=bias, dtype=dtype,
                             config=DIRECT_TILES, **extra)
    assert_close(out, expected)


def expert_parallel_case(E_global, M, k, H, I, dtype, device, seed=0):
    """Rank 1 of two: it holds the odd global experts (local ids 0, 1, …). Returns the
    global weights, the local ones, the map, tokens and global routing (with −1 ids)."""
    w13, w2, _, _ = random_experts(E_global, H, I, dtype=dtype, device=device, seed=seed)
    table = torch.full((E_global,), -1, dtype=torch.int32)
    table[1::2] = torch.arange(E_global // 2, dtype=torch.int32)
    g = torch.Generator(device=device).manual_seed(seed + 7)
    hidden = torch.randn(M, H, generator=g, device=device).to(dtype)
    ids, weights = random_routing(M, E_global, k, device=device, seed=seed)
    ids = drop_some(ids)
    return (w13, w2, w13[1::2].contiguous(), w2[1::2].contiguous(), table.to(device), hidden,
            ids, weights)


@pytest.mark.interpreter
@pytest.mark.parametrize("config", [None, DIRECT_TILES], ids=["plan", "direct"])
def test_expert_map_interpreter(config):
    # This rank's partial sum: the global layer with every even expert's pairs removed.
    w13, w2, w13_local, w2_local, table, hidden, ids, weights = expert_parallel_case(
        8, 5, 3, 64, 32, torch.float32, "cpu")
    out = poison_(torch.empty_like(hidden))
    moekit.fused_experts(hidden, w13_local, w2_local, ids, weights, expert_map=table,
                         config=config, out=out, backend="triton")
    odd_only = torch.where((ids >= 0) & (ids % 2 == 1), ids, -1)
    expected = reference.fused_experts(hidden.double(), w13.double(), w2.double(), odd_only,
                                       weights)
    assert_close(out, expected)


def test_expert_map_reference_backend():
    w13, w2, w13_local, w2_local, table, hidden, ids, weights = expert_parallel_case(
        6, 4, 2, 32, 16, torch.float32, "cpu")
    out = moekit.fused_experts(hidden, w13_local, w2_local, ids, weights, expert_map=table,
                               backend="reference")
    odd_only = torch.where((ids >= 0) & (ids % 2 == 1), ids, -1)
    assert_close(out, reference.fused_experts(hidden, w13, w2, odd_only, weights))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 3, 300])
def test_expert_map_gpu(M):
    w13, w2, w13_local, w2_local, table, hidden, ids, weights = expert_parallel_case(
        64, M, 8, 512, 256, torch.bfloat16, "cuda")
    out = poison_(torch.empty_like(hidden))
    poison_cuda_cache()
    moekit.fused_experts(hidden, w13_local, w2_local, ids, weights, expert_map=table, out=out)
    odd_only = torch.where((ids >= 0) & (ids % 2 == 1), ids, -1)
    expected = reference.fused_experts(hidden.float(), w13, w2, odd_only, weights)
    assert_close(out, expected.float(), REL_L2_TOL[torch.bfloat16], f"M={M}")


def split_tiles(slots_per_program: int) -> ExpertsConfig:
    """DIRECT_TILES with GEMM2 summing this many of a token's slots per program."""
    return ExpertsConfig(1, DIRECT_TILES.gemm1, GemmConfig(16, 16, slots_per_program, 1, 1))


DIRECT_SPLIT_CASES = [
    # (M, E, k, H, I, activation, bias, dtype, slots per program, extra, why)
    (1, 8, 3, 64, 32, "silu", True, torch.float32, 1, {}, "a program per slot; biases"),
    (5, 4, 3, 96, 48, "swigluoai", True, torch.float16, 2, {},
     "two slots per program: parts of 2 and 1; fp16"),
    (6, 4, 2, 72, 40, "gelu", True, torch.float32, 1, {"ids_transform": drop_some},
     "dropped and sentinel ids; ragged H and I"),
    (4, 4, 2, 64, 32, "silu", False, torch.float32, 1, {"weight_on_input": True},
     "router weight on the input"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("M,E,k,H,I,activation,bias,dtype,per,extra,why", DIRECT_SPLIT_CASES)
def test_direct_path_split_slots_interpreter(M, E, k, H, I, activation, bias, dtype, per, extra,
                                             why):
    # GEMM2 over (token, part of its slots) programs: each part's float32 sum to a buffer,
    # the token's last program to arrive adds them and writes the row.
    out, expected = run_case(M, E, k, H, I, activation, bias=bias, dtype=dtype,
                             config=split_tiles(per), **extra)
    assert_close(out, expected)


@pytest.mark.interpreter
def test_direct_gemm1_zeroes_gemm2_arrivals():
    # The counters come from torch.empty: GEMM1 must zero them, or GEMM2's last program
    # never sees its count and the output stays unwritten.
    from moekit.experts_direct import (
        gemm2_arrivals,
        launch_direct_gemm1,
        launch_direct_gemm2,
    )

    M, E, k, H, I = 3, 4, 2, 64, 32
    w13, w2, _, _ = random_experts(E, H, I, gated=True, bias=False, dtype=torch.float32)
    hidden = torch.randn(M, H, generator=torch.Generator().manual_seed(3))
    ids, weights = random_routing(M, E, k, seed=3)
    tiles = split_tiles(1)
    arrivals = gemm2_arrivals(ids, H, tiles.as_ints()[6:11])
    assert arrivals.shape == (M, H // 16)
    arrivals.fill_(7)
    inter = launch_direct_gemm1(hidden, w13, None, ids, weights, "silu", 1.0, 0.0, False,
                                tiles.as_ints()[1:6], arrivals)
    assert torch.equal(arrivals, torch.zeros_like(arrivals))
    out = poison_(torch.empty_like(hidden))
    launch_direct_gemm2(inter, w2, None, ids, weights, True, tiles.as_ints()[6:11], out,
                        arrivals)
    expected = reference.fused_experts(hidden.double(), w13.double(), w2.double(), ids, weights)
    assert_close(out, expected)
    assert torch.equal(arrivals, torch.full_like(arrivals, k))


@pytest.mark.interpreter
@pytest.mark.parametrize("per", [8, 1])
def test_direct_path_unrouted_token_gives_zero_row(per):
    # GEMM2 writes a token's row even when none of its slots has an expert (GEMM1 wrote
    # none of their `inter` rows, which may hold NaN: they must not be read).
    out, expected = run_case(
        5, 4, 2, 64, 32, "silu", config=split_tiles(per),
        ids_transform=lambda ids: ids.index_fill(0, torch.tensor([1, 4]), -1))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[4], torch.zeros_like(out[4]))
    assert_close(out, expected)


def test_direct_block_m():
    tiles = GemmConfig(32, 32)
    assert ExpertsConfig(1, tiles, tiles).direct
    assert not ExpertsConfig(16, tiles, tiles).direct
    for block_m in (2, 8, 24):
        with pytest.raises(ValueError, match="block_m"):
            ExpertsConfig(block_m, tiles, tiles)


def test_tail_block_m_is_half_the_row_tile():
    tiles = GemmConfig(32, 32)
    assert ExpertsConfig(128, tiles, tiles, 64).tail_block_m == 64
    assert ExpertsConfig(128, tiles, tiles).tail_block_m == 0
    for block_m, tail in [(128, 32), (64, 64), (16, 8)]:
        with pytest.raises(ValueError, match="tail_block_m"):
            ExpertsConfig(block_m, tiles, tiles, tail)


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values as `t` in a strided view (its last two dims stored transposed)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.interpreter
@pytest.mark.parametrize("M", [4, 40], ids=["direct", "plan"])
def test_strided_biases_and_weights_interpreter(M):
    # A bias sliced or transposed out of a wider tensor was read as if its columns were
    # adjacent (the kernels take its expert stride only): rel L2 ~1. A strided weight is
    # right but copied on every call, so it warns.
    E, k, H, I = 4, 2, 64, 32
    w13, w2, b13, b2 = random_experts(E, H, I, bias=True, dtype=torch.float16)
    hidden = torch.randn(M, H).half()
    ids, weights = random_routing(M, E, k)
    out = poison_(torch.empty_like(hidden))
    with pytest.warns(UserWarning, match=r"w2: not contiguous .* every call copies"):
        moekit.fused_experts(hidden, w13, column_major(w2), ids, weights, activation="swigluoai",
                             b13=column_major(b13), b2=column_major(b2), out=out,
                             backend="triton")
    expected = reference.fused_experts(hidden.double(), w13.double(), w2.double(), ids, weights,
                                       activation="swigluoai", b13=b13.double(), b2=b2.double())
    assert_close(out, expected)


@pytest.mark.interpreter
def test_unrouted_token_gives_zero_row():
    # A token whose slots are all dropped receives nothing, not garbage.
    out, expected = run_case(6, 4, 2, 64, 32, "silu",
                             ids_transform=lambda ids: ids.index_fill(0, torch.tensor([2]), -1))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert_close(out, expected)


@pytest.mark.interpreter
@pytest.mark.parametrize("config,tma", [(None, False), (TAIL_TILES, False),
                                        (TAIL_TMA_TILES, True)],
                         ids=["heuristic", "tail-tiles", "tma-tail-tiles"])
def test_every_pair_dropped_gives_zeros_interpreter(monkeypatch, config, tma):
    # An expert-parallel rank that got no tokens: every id −1, so the plan holds no row
    # tile; every kernel still runs, over nothing, and the output is all zeros.
    if tma:
        monkeypatch.setattr("moekit._tma.device_has_tma", lambda device: True)
    out, expected = run_case(40, 4, 2, 64, 32, "silu", bias=True, config=config,
                             ids_transform=lambda ids: torch.full_like(ids, -1))
    assert torch.equal(expected, torch.zeros_like(expected))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.interpreter
def test_opcheck_interpreter():
    # Schema, fake implementation and mutation annotations are consistent for torch.compile.
    w13, w2, _, _ = random_experts(4, 32, 16)
    hidden = torch.randn(3, 32)
    ids, weights = random_routing(3, 4, 2)
    config = TAIL_TILES.as_ints()  # the op's flat form, tail tiles on
    args = (hidden, w13, w2, ids, weights, None, None, "silu", 1.702, 7.0, False, config,
            torch.empty_like(hidden))
    torch.library.opcheck(torch.ops.moekit.fused_experts.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_zero_tokens():
    w13, w2, _, _ = random_experts(4, 32, 16)
    hidden = torch.empty(0, 32)
    ids = torch.empty(0, 2, dtype=torch.int32)
    out = moekit.fused_experts(hidden, w13, w2, ids, torch.empty(0, 2))
    assert out.shape == (0, 32)


def test_cpu_auto_backend_is_reference():
    out, expected = None, None
    w13, w2, _, _ = random_experts(4, 32, 16)
    hidden = torch.randn(5, 32)
    ids, weights = random_routing(5, 4, 2)
    out = moekit.fused_experts(hidden, w13, w2, ids, weights)
    expected = reference.fused_experts(hidden, w13, w2, ids, weights)
    assert torch.equal(out, expected)


def test_triton_backend_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    w13, w2, _, _ = random_experts(2, 16, 16)
    ids, weights = random_routing(1, 2, 1)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        moekit.fused_experts(torch.randn(1, 16), w13, w2, ids, weights, backend="triton")


def _args():
    w13, w2, _, _ = random_experts(4, 32, 16)
    hidden = torch.randn(5, 32)
    ids, weights = random_routing(5, 4, 2)
    return dict(hidden=hidden, w13=w13, w2=w2, topk_ids=ids, topk_weights=weights)


BAD_INPUTS = [
    # (change, error, message fragment, why)
    ({"hidden": torch.randn(5, 32).to(torch.int8)}, TypeError, "hidden", "integer activations"),
    ({"hidden": torch.randn(5, 2, 32)}, ValueError, "hidden", "3-d hidden"),
    ({"w13": torch.randn(4, 32, 32).half()}, TypeError, "w13", "dtype differs from hidden"),
    ({"w13": torch.randn(4, 30, 32)}, ValueError, "w13", "rows not 2I"),
    ({"w13": torch.randn(3, 32, 32)}, ValueError, "w13", "E differs from w2"),
    ({"w2": torch.randn(4, 31, 16)}, ValueError, "w2", "H differs from hidden"),
    ({"topk_ids": torch.zeros(5, 2)}, TypeError, "topk_ids", "float ids"),
    ({"topk_ids": torch.zeros(4, 2, dtype=torch.int32)}, ValueError, "topk_ids", "wrong M"),
    ({"topk_weights": torch.ones(5, 3)}, ValueError, "topk_weights", "shape differs from ids"),
    ({"b2": torch.zeros(4, 31)}, ValueError, "b2", "bias of the wrong width"),
    ({"activation": "swish"}, ValueError, "activation", "unknown activation"),
    ({"w13": torch.randn(0, 32, 32), "w2": torch.randn(0, 32, 16)}, ValueError,
     "w13, w2: expected at least one expert",
     "no experts: refused on every path, not zeros on some and a plan error on others"),
    ({"config": SMALL_TILES.as_ints()}, TypeError, "config: expected an ExpertsConfig",
     "the flat list of as_ints: refused on the reference path too"),
    pytest.param({"config": SMALL_TILES.as_ints(), "backend": "triton"}, TypeError,
                 "config: expected an ExpertsConfig",
                 "a list on the kernel path: no AttributeError from deep inside",
                 marks=pytest.mark.interpreter),
]


@pytest.mark.parametrize("change,error,fragment,why", BAD_INPUTS)
def test_bad_inputs(change, error, fragment, why):
    args = _args()
    args.update(change)
    with pytest.raises(error, match=fragment):
        moekit.fused_experts(**args)


def test_fused_moe_checks_top_k():
    w13, w2, _, _ = random_experts(4, 32, 16)
    hidden, logits = torch.randn(3, 32), torch.randn(3, 4)
    for bad in (0, 5, 2.0):
        with pytest.raises(ValueError, match="top_k"):
            moekit.fused_moe(hidden, logits, w13, w2, bad)
    with pytest.raises(ValueError, match="router_logits"):
        moekit.fused_moe(hidden, torch.randn(3, 5), w13, w2, 2)


def test_fused_moe_with_expert_map_checks_the_global_router():
    w13, w2, _, _ = random_experts(4, 32, 16)  # this rank's 4 of 8 experts
    table = torch.tensor([0, -1, 1, -1, 2, -1, 3, -1], dtype=torch.int32)
    hidden = torch.randn(3, 32)
    with pytest.raises(ValueError, match="router_logits: expected 8 columns"):
        moekit.fused_moe(hidden, torch.randn(3, 4), w13, w2, 2, expert_map=table)
    with pytest.raises(ValueError, match="top_k: expected an int in \\[1, 8\\]"):
        moekit.fused_moe(hidden, torch.randn(3, 8), w13, w2, 9, expert_map=table)


@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_fused_moe_ranks_with_expert_maps_sum_to_the_whole_layer(backend, monkeypatch):
    # Two ranks holding the even and the odd experts of 8; the router sees all 8.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w13, w2, _, _ = random_experts(8, 32, 16, seed=3)
    hidden, logits = torch.randn(9, 32), torch.randn(9, 8)
    partials = []
    for rank in (0, 1):
        table = torch.full((8,), -1, dtype=torch.int32)
        table[rank::2] = torch.arange(4, dtype=torch.int32)
        out = moekit.fused_moe(hidden, logits, w13[rank::2], w2[rank::2], 3,
                               expert_map=table, backend=backend)
        expected = reference.fused_moe(hidden, logits, w13[rank::2], w2[rank::2], 3,
                                       expert_map=table)
        assert_close(out, expected, name=f"rank {rank}")
        partials.append(out)
    whole = reference.fused_moe(hidden, logits, w13, w2, 3)
    assert_close(partials[0] + partials[1], whole, name="the ranks' sum")


LLAMA4_LIKE = dict(method="sigmoid", renormalize=False)


@pytest.mark.parametrize("k,bias,options,control", [
    (3, True, dict(method=DEEPSEEK_LIKE), {}),
    (3, False, dict(method="sigmoid"), {}),
    (3, False, dict(method=Routing("sigmoid", renormalize=False)), {}),
    # Llama-4: sigmoid top-1 without renormalisation, the weight on the expert's input
    (1, False, dict(LLAMA4_LIKE, apply_router_weight_on_input=True), LLAMA4_LIKE),
], ids=["deepseek-groups-bias", "sigmoid", "sigmoid-no-renorm", "llama4-weight-on-input"])
@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_fused_moe_passes_its_routing_options(k, bias, options, control, backend, monkeypatch):
    # The options reach `route` and the experts: the result is the reference's under
    # them, and not the control's (the default softmax, or the weight on the output).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w13, w2, _, _ = random_experts(8, 32, 16, seed=4)
    hidden, logits = torch.randn(9, 32), torch.randn(9, 8)
    if bias:
        options = dict(options, e_score_correction_bias=torch.randn(8))
    out = moekit.fused_moe(hidden, logits, w13, w2, k, backend=backend, **options)
    expected = reference.fused_moe(hidden, logits, w13, w2, k, **options)
    assert_close(out, expected, name=str(options))
    other = reference.fused_moe(hidden, logits, w13, w2, k, **control)
    assert (expected - other).abs().max() > 1e-3, "the options changed the result"


def test_fused_moe_checks_the_routing():
    w13, w2, _, _ = random_experts(8, 32, 16)
    hidden, logits = torch.randn(3, 32), torch.randn(3, 8)
    with pytest.raises(ValueError, match="n_group: 3 does not divide E = 8"):
        moekit.fused_moe(hidden, logits, w13, w2, 2, method=Routing("sigmoid", n_group=3))
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        moekit.fused_moe(hidden, logits, w13, w2, 2, method="sigmoid",
                         e_score_correction_bias=torch.zeros(7))


def test_fused_moe_reference_on_cpu():
    w13, w2, _, _ = random_experts(6, 32, 16)
    hidden, logits = torch.randn(7, 32), torch.randn(7, 6)
    out = moekit.fused_moe(hidden, logits, w13, w2, 2)
    expected = reference.fused_moe(hidden, logits, w13, w2, 2)
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_presets_gpu(preset, dtype):
    p = PRESETS[preset]
    E, k, H, I, activation, bias = p.num_experts, p.top_k, p.hidden, p.inter, p.activation, p.bias
    w13, w2, b13, b2 = random_experts(E, H, I, bias=bias, dtype=dtype, device="cuda")
    f32 = lambda t: None if t is None else t.float()
    for M, skew in [(1, 0.0), (37, 0.0), (200, 0.0), (512, 0.0), (512, 8.0), (4096, 0.0)]:
        hidden = torch.randn(M, H, device="cuda", dtype=dtype)
        ids, weights = random_routing(M, E, k, skew=skew, device="cuda", seed=M)
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        moekit.fused_experts(hidden, w13, w2, ids, weights, activation=activation, b13=b13,
                             b2=b2, out=out)
        rows = slice(0, min(M, 256))  # the reference is row-independent: check a slice
        expected = reference.fused_experts(  # converts one expert's weights at a time
            hidden[rows].float(), w13, w2, ids[rows], weights[rows], activation=activation,
            b13=f32(b13), b2=f32(b2),
        )
        assert_close(out[rows], expected.float(), REL_L2_TOL[dtype], f"{preset} M={M} skew={skew}")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "gpt-oss-120b", "granite-3.0-3b-a800m"])
def test_tail_tiles_gpu(preset):
    # The prefill tiles with tail tiles (TMA pairs, pointer tails) against the reference.
    p = PRESETS[preset]
    E, k, H, I = p.num_experts, p.top_k, p.hidden, p.inter
    w13, w2, b13, b2 = random_experts(E, H, I, bias=p.bias, dtype=torch.bfloat16, device="cuda")
    f32 = lambda t: None if t is None else t.float()
    config = dataclasses.replace(tiles_for_block_m(128), tail_block_m=64)  # prefill tiles
    for M, skew in [(1024, 0.0), (4096, 0.0), (4096, 4.0)]:
        hidden = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
        ids, weights = random_routing(M, E, k, skew=skew, device="cuda", seed=M)
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        moekit.fused_experts(hidden, w13, w2, ids, weights, activation=p.activation, b13=b13,
                             b2=b2, config=config, out=out)
        rows = slice(0, 256)
        expected = reference.fused_experts(
            hidden[rows].float(), w13, w2, ids[rows], weights[rows], activation=p.activation,
            b13=f32(b13), b2=f32(b2),
        )
        assert_close(out[rows], expected.float(), REL_L2_TOL[torch.bfloat16],
                     f"{preset} M={M} skew={skew}")


def gpu_direct_tiles(slots_per_program: int) -> ExpertsConfig:
    return ExpertsConfig(1, GemmConfig(32, 256, 1, 4, 3),
                         GemmConfig(16, 256, slots_per_program, 4, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("per", [8, 1], ids=["token-per-program", "slot-per-program"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_direct_path_gpu(preset, per):
    # The direct path forced at decode token counts, bf16, against the reference; then
    # replayed in a CUDA graph on new inputs, bitwise equal to an eager call. With a
    # program per slot, GEMM2's programs race to finish a token: the sum must not care.
    p = PRESETS[preset]
    E, k, H, I = p.num_experts, p.top_k, p.hidden, p.inter
    w13, w2, b13, b2 = random_experts(E, H, I, bias=p.bias, dtype=torch.bfloat16, device="cuda")
    f32 = lambda t: None if t is None else t.float()
    run = lambda h, i, w, out: moekit.fused_experts(
        h, w13, w2, i, w, activation=p.activation, b13=b13, b2=b2,
        config=gpu_direct_tiles(per), out=out)
    for M in (1, 3, 16):
        hidden = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
        ids, weights = random_routing(M, E, k, device="cuda", seed=M)
        poison_cuda_cache()
        out = run(hidden, ids, weights, poison_(torch.empty_like(hidden)))
        expected = reference.fused_experts(hidden.float(), w13, w2, ids, weights,
                                           activation=p.activation, b13=f32(b13), b2=f32(b2))
        assert_close(out, expected.float(), REL_L2_TOL[torch.bfloat16], f"{preset} M={M}")

    hidden = torch.randn(2, H, device="cuda", dtype=torch.bfloat16)
    ids, weights = random_routing(2, E, k, device="cuda", seed=5)
    out = torch.empty_like(hidden)
    run(hidden, ids, weights, out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(hidden, ids, weights, out)
    new_ids, new_weights = random_routing(2, E, k, device="cuda", seed=6)
    hidden.normal_()
    ids.copy_(new_ids)
    weights.copy_(new_weights)
    graph.replay()
    assert torch.equal(out, run(hidden, ids, weights, torch.empty_like(hidden)))
    for _ in range(10):
        assert torch.equal(out, run(hidden, ids, weights, poison_(torch.empty_like(hidden))))


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "gpt-oss-120b", "mixtral-8x7b"])
def test_tma_path_equals_pointer_path_gpu(monkeypatch, preset):
    # TMA only changes how tiles reach shared memory, not the arithmetic: bitwise equal.
    p = PRESETS[preset]
    E, k, H, I = p.num_experts, p.top_k, p.hidden, p.inter
    w13, w2, b13, b2 = random_experts(E, H, I, bias=p.bias, dtype=torch.bfloat16, device="cuda")
    M = 2048
    hidden = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    ids, weights = random_routing(M, E, k, skew=2.0, device="cuda", seed=3)
    config = moekit.tuning.default_config(M, E, k, H, I)
    assert moekit.experts.use_tma(hidden, w13, w2, config.block_m)
    run = lambda: moekit.fused_experts(hidden, w13, w2, ids, weights, activation=p.activation,
                                       b13=b13, b2=b2, config=config,
                                       out=poison_(torch.empty_like(hidden)))
    with_tma = run()
    monkeypatch.setattr("moekit.experts.use_tma", lambda *args: False)
    assert torch.equal(with_tma, run())


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_inputs():
    E, k, H, I = 16, 4, 512, 256
    w13, w2, _, _ = random_experts(E, H, I, dtype=torch.bfloat16, device="cuda")
    hidden = torch.randn(64, H, device="cuda", dtype=torch.bfloat16)
    ids, weights = random_routing(64, E, k, device="cuda")
    call = lambda: moekit.fused_experts(hidden, w13, w2, ids, weights)
    graph, out = capture_cuda_graph(call)
    for seed in (1, 2):
        new_ids, new_weights = random_routing(64, E, k, device="cuda", seed=seed, skew=4.0 * seed)
        hidden.copy_(seeded_randn_like(hidden, seed))
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        out.fill_(float("nan"))
        graph.replay()
        expected = reference.fused_experts(hidden, w13, w2, ids, weights)
        assert_close(out, expected, name=f"replay {seed}")


@pytest.mark.gpu
def test_torch_compile_gpu():
    E, k, H, I = 8, 2, 256, 128
    w13, w2, _, _ = random_experts(E, H, I, dtype=torch.bfloat16, device="cuda")
    hidden = torch.randn(32, H, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(32, E, device="cuda")

    @torch.compile(fullgraph=True)
    def layer(x, router_logits):
        return moekit.fused_moe(x * 2, router_logits, w13, w2, k) + 1

    out = layer(hidden, logits)
    expected = reference.fused_moe(hidden * 2, logits, w13, w2, k) + 1
    assert_close(out, expected)


@pytest.mark.gpu
def test_expert_map_torch_compile_gpu():
    # The id mapping runs outside the custom op: torch.compile traces its Triton launch.
    w13, w2, w13_local, w2_local, table, hidden, ids, weights = expert_parallel_case(
        16, 8, 2, 256, 128, torch.bfloat16, "cuda")

    @torch.compile(fullgraph=True)
    def layer(x, topk_ids, topk_weights):
        return moekit.fused_experts(x, w13_local, w2_local, topk_ids, topk_weights,
                                    expert_map=table)

    odd_only = torch.where((ids >= 0) & (ids % 2 == 1), ids, -1)
    expected = reference.fused_experts(hidden.float(), w13, w2, odd_only, weights)
    assert_close(layer(hidden, ids, weights), expected.float(), REL_L2_TOL[torch.bfloat16])


@pytest.mark.gpu
def test_deterministic_gpu():
    E, k, H, I = 64, 8, 1024, 512
    w13, w2, _, _ = random_experts(E, H, I, dtype=torch.bfloat16, device="cuda")
    hidden = torch.randn(2048, H, device="cuda", dtype=torch.bfloat16)
    ids, weights = random_routing(2048, E, k, device="cuda")
    first = moekit.fused_experts(hidden, w13, w2, ids, weights)
    for _ in range(3):
        assert torch.equal(moekit.fused_experts(hidden, w13, w2, ids, weights), first)


@pytest.mark.gpu
@pytest.mark.slow
def test_index_arithmetic_beyond_int32_gpu():
    # M·k·H > 2^31 and M·H·2 bytes > 2^31: row offsets must be 64-bit.
    M, E, k, H, I = 36_000, 8, 8, 8192, 64
    assert M * k * H > 2**31
    w13, w2, _, _ = random_experts(E, H, I, dtype=torch.bfloat16, device="cuda")
    hidden = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    ids, weights = random_routing(M, E, k, device="cuda")
    out = moekit.fused_experts(hidden, w13, w2, ids, weights)
    for rows in (slice(0, 64), slice(M - 64, M)):
        expected = reference.fused_experts(hidden[rows], w13, w2, ids[rows], weights[rows])
        assert_close(out[rows], expected, name=f"rows {rows}")
