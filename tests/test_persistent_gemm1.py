"""`MOEKIT_GEMM1_PERSISTENT` (`moekit._persistent_gemm1`): the plan GEMM1s in persistent
programs, each a contiguous run of tiles — every tile computed once, as one program a tile
computes it."""

import pytest
import torch

import moekit
from helpers import assert_close, poison_, random_experts, random_routing, seeded_randn_like
from moekit import _persistent_gemm1
from moekit.bench.presets import PRESETS
from moekit.quant import QuantScheme
from moekit.tuning import ExpertsConfig, GemmConfig
from test_experts import SMALL_TILES, drop_some, run_case
from test_experts_fp8 import KERNEL_TOL, SMALL_BLOCKS, make_case, quantize_by_chunks, run_triton


def test_parse():
    assert _persistent_gemm1.parse("") == (0, False)
    assert _persistent_gemm1.parse("2") == (2, False)
    assert _persistent_gemm1.parse("3,flat") == (3, True)
    for bad in ("0", "x", "2,nested", "-1", "2,"):
        with pytest.raises(ValueError, match="MOEKIT_GEMM1_PERSISTENT"):
            _persistent_gemm1.parse(bad)


def test_no_programs_with_tail_tiles_or_off(monkeypatch):
    cpu = torch.device("cpu")
    assert _persistent_gemm1.gemm1_programs(cpu, 0) == 0
    monkeypatch.setattr(_persistent_gemm1, "PROGRAMS_PER_SM", 2)
    assert _persistent_gemm1.gemm1_programs(cpu, 16) == 0
    assert _persistent_gemm1.gemm1_programs(cpu, 0) > 0


@pytest.fixture(params=[(1, False), (3, True)], ids=["one-per-sm", "three-flat"])
def persistent(request, monkeypatch):
    """The control on, with the interpreter's few 'SMs': runs of several tiles a program,
    some programs with none."""
    per_sm, flat = request.param
    monkeypatch.setattr(_persistent_gemm1, "PROGRAMS_PER_SM", per_sm)
    monkeypatch.setattr(_persistent_gemm1, "FLATTEN", flat)
    return per_sm


CASES_16 = [
    # (M, E, k, H, I, activation, bias, dtype, extra, why)
    (17, 5, 2, 72, 24, "silu", False, torch.float32, {"config": SMALL_TILES},
     "ragged H and I; several K steps; E not a power of two"),
    (24, 4, 2, 64, 32, "swigluoai", True, torch.float16,
     {"ids_transform": drop_some, "config": SMALL_TILES}, "dropped ids; biases; fp16"),
    (40, 8, 2, 64, 32, "silu", False, torch.float32,
     {"ids_transform": lambda ids: torch.full_like(ids, 3),
      "config": ExpertsConfig(32, GemmConfig(16, 16, 2, 1, 1), GemmConfig(32, 16, 1, 1, 1))},
     "one expert's three row tiles: runs across row tiles"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("M,E,k,H,I,activation,bias,dtype,extra,why", CASES_16)
def test_persistent_gemm1_interpreter(persistent, monkeypatch, M, E, k, H, I, activation, bias,
                                      dtype, extra, why):
    out, expected = run_case(M, E, k, H, I, activation, bias=bias, dtype=dtype, **extra)
    assert_close(out, expected)
    monkeypatch.setattr(_persistent_gemm1, "PROGRAMS_PER_SM", 0)
    tiles, _ = run_case(M, E, k, H, I, activation, bias=bias, dtype=dtype, **extra)
    assert torch.equal(out, tiles), "not what one program a tile computes"


@pytest.mark.interpreter
@pytest.mark.parametrize("scheme", ["fp8_tensor", SMALL_BLOCKS])
def test_persistent_fp8_gemm1_interpreter(persistent, monkeypatch, scheme):
    config = ExpertsConfig(16, GemmConfig(128 if scheme == "fp8_tensor" else 32, 32, 2, 1, 1),
                           GemmConfig(32, 16, 1, 1, 1))
    case = make_case(scheme, 20, 5, 2, 96, 128, bias=True, skew=2.0)
    out, expected = run_triton(*case, config=config)
    assert_close(out, expected, KERNEL_TOL)
    monkeypatch.setattr(_persistent_gemm1, "PROGRAMS_PER_SM", 0)
    tiles, _ = run_triton(*case, config=config)
    assert torch.equal(out, tiles), "not what one program a tile computes"


@pytest.mark.gpu
@pytest.mark.parametrize("form", [(2, False), (2, True), (1, False)], ids=["2", "2-flat", "1"])
@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "gpt-oss-120b", "granite-3.0-3b-a800m"])
def test_persistent_gemm1_gpu(monkeypatch, preset, form):
    # The heuristic's decode tiles, bf16 and fp8, under the control: bitwise what one
    # program a tile gives (eager calls not replayed: the control changes between them).
    monkeypatch.setattr(moekit._replay, "enabled", False)
    p = PRESETS[preset]
    E = min(p.num_experts, 64)
    w13, w2, b13, b2 = random_experts(E, p.hidden, p.inter, bias=p.bias, dtype=torch.bfloat16,
                                      device="cuda")
    scheme = QuantScheme.parse("fp8_tensor")
    q13, q2 = quantize_by_chunks(w13, scheme.weight), quantize_by_chunks(w2, scheme.weight)
    for m in (8, 64):
        hidden = seeded_randn_like(torch.empty(m, p.hidden, device="cuda",
                                               dtype=torch.bfloat16), m)
        ids, weights = random_routing(m, E, p.top_k, device="cuda", seed=m)

        def both(hidden=hidden, ids=ids, weights=weights):
            bf16 = moekit.fused_experts(hidden, w13, w2, ids, weights, activation=p.activation,
                                        b13=b13, b2=b2, out=poison_(torch.empty_like(hidden)))
            fp8 = moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme,
                                           activation=p.activation, b13=b13, b2=b2,
                                           out=poison_(torch.empty_like(hidden)))
            return bf16, fp8

        monkeypatch.setattr(_persistent_gemm1, "PROGRAMS_PER_SM", 0)
        tiles = both()
        monkeypatch.setattr(_persistent_gemm1, "PROGRAMS_PER_SM", form[0])
        monkeypatch.setattr(_persistent_gemm1, "FLATTEN", form[1])
        runs = both()
        for name, a, b in zip(("bf16", "fp8"), tiles, runs, strict=True):
            assert torch.equal(a, b), f"{preset} M={m} {name}"
