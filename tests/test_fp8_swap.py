"""The fp8 GEMMs' swapped dots (`moekit._fp8_swap`) against the quantised reference.

Each case runs the layer twice, every GEMM swapped (block scales included, which are
opt-in) and none, and checks both against `fused_experts_quantized`, and that the
launches took the orientation asked for: a swapped GEMM computes its products
transposed, with its scales transposed alongside (and the direct GEMM1 its gate and up
rows stacked into one operand), so every scale form is covered — per tensor, per channel
and token, K groups with uniform and varying column groups, static input scales — on
both paths.

On the GPU the interpreter-sized cases check what only a GPU compiles (the MMA layouts
of the transposed operands and products: a wrong one costs O(1)) at TINY_CASE_TOL, not
DESIGN.md's 1e-2: a swapped GEMM1 sums at wgmma's precision (`moekit._fp8_swap`), which
can move one of GEMM2's fp8 inputs to its neighbouring value, up to 7% of it, and in a
10-token layer one such value is visible (the static relu² case: 2.7e-3 unswapped,
1.7e-2 with GEMM1 swapped, in one seed of six; 3.0–5.7e-3 in the other five; H100,
session 44, `bench/scripts/fp8_swap_static_diag.py`). The
layer-sized cases (`GPU_CASES`) keep 1e-2.
"""

from __future__ import annotations

import pytest
import torch

import moekit
from helpers import assert_close
from moekit import _fp8_swap
from moekit.tuning import ExpertsConfig, GemmConfig
from test_experts_fp8 import (
    GPU_TOL,
    KERNEL_TOL,
    SMALL_BLOCKS,
    STATIC,
    direct,
    make_case,
    run_triton,
)

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

TINY_CASE_TOL = 3e-2
EVERYTHING = frozenset((*_fp8_swap.GEMMS, _fp8_swap.BLOCK))


def plan(block_m, n1, k1, n2, k2):
    """A plan-path configuration with these row and (block_n, block_k) tiles."""
    return ExpertsConfig(block_m, GemmConfig(n1, k1, 1, 4, 2), GemmConfig(n2, k2, 1, 4, 2))


CASES = [
    # (scheme, M, E, k, H, I, activation, bias, dtype, config, swapped, why)
    ("fp8_tensor", 2, 4, 2, 256, 192, "silu", False, torch.float32, direct(32, 128, 64, 128),
     {"direct1", "direct2"}, "per tensor: GEMM1's 32 gate + 32 up rows one operand; GEMM2 "
     "64 columns; I a partial group"),
    ("fp8_channel", 2, 5, 2, 160, 128, "swigluoai", True, torch.float16,
     direct(32, 64, 64, 128, per=1), {"direct1", "direct2"},
     "per channel and token; biases; GEMM2 a program per slot; H a partial K tile"),
    ("fp8_block", 3, 4, 3, 640, 128, "silu", True, torch.float32,
     direct(32, 256, 64, 128, per=2), {"direct1", "direct2"},
     "128×128 blocks: GEMM1's 256-deep tiles as two sub-steps, input and weight groups "
     "multiplied before the loop; GEMM2 in parts of 2 and 1"),
    (SMALL_BLOCKS, 2, 5, 2, 96, 72, "gelu", False, torch.float32, direct(32, 32, 64, 32),
     {"direct1", "direct2"}, "32×32 blocks: the up rows start off the groups (I = 72) and "
     "GEMM2's 64 columns span two groups: weight scales a vector per step"),
    (SMALL_BLOCKS, 2, 3, 1, 64, 128, "relu2", False, torch.float32, direct(64, 32, 64, 32),
     {"direct1", "direct2"}, "no gate: GEMM1's 64 rows alone; k = 1"),
    (STATIC, 2, 4, 2, 128, 128, "silu", False, torch.float32, direct(32, 64, 64, 64, per=1),
     {"direct1", "direct2"}, "static (calibrated) input scales for both GEMMs"),
    ("fp8_tensor", 9, 4, 2, 192, 256, "silu", True, torch.float32,
     plan(16, 128, 64, 64, 64), {"plan1", "plan2"},
     "plan path, 16-row tiles, per tensor; biases; H a partial K tile"),
    ("fp8_channel", 20, 3, 2, 128, 128, "swigluoai", False, torch.float16,
     plan(32, 128, 64, 64, 64), {"plan1", "plan2"}, "plan path, 32-row tiles, per channel"),
    (SMALL_BLOCKS, 12, 4, 2, 96, 96, "silu", False, torch.float32, plan(16, 64, 32, 64, 32),
     {"plan1", "plan2"}, "plan path, 32×32 blocks: input and weight scales per K step, "
     "columns over two groups"),
    (STATIC, 10, 4, 2, 128, 128, "relu2", False, torch.float32, plan(16, 64, 64, 64, 64),
     {"plan1", "plan2"}, "plan path, static scales, no gate"),
]


@pytest.fixture
def swap_decisions(monkeypatch):
    """Records (GEMM, whether it swapped) for every launch."""
    seen = []
    real = _fp8_swap.swap_ab

    def recording(gemm, rows, weight_rows, weight_per_k):
        swapped = real(gemm, rows, weight_rows, weight_per_k)
        seen.append((gemm, swapped))
        return swapped

    monkeypatch.setattr(moekit.experts_fp8, "swap_ab", recording)
    monkeypatch.setattr(moekit.experts_direct_fp8, "swap_ab", recording)
    return seen


@pytest.mark.interpreter
@pytest.mark.parametrize("on", [True, False], ids=["swapped", "unswapped"])
@pytest.mark.parametrize("scheme,M,E,k,H,I,act,bias,dtype,config,swapped,why", CASES)
def test_swapped_gemms_match_quantised_reference_interpreter(
        monkeypatch, swap_decisions, on, scheme, M, E, k, H, I, act, bias, dtype, config,
        swapped, why):
    monkeypatch.setattr(_fp8_swap, "SWAPPED", EVERYTHING if on else frozenset())
    case = make_case(scheme, M, E, k, H, I, act, bias=bias, dtype=dtype)
    out, expected = run_triton(*case, act=act, config=config)
    assert_close(out, expected, KERNEL_TOL, name=why)
    assert sorted(swap_decisions) == sorted((gemm, on) for gemm in swapped)


def test_swap_switch_parses_names():
    assert _fp8_swap._parse("1") == frozenset(_fp8_swap.GEMMS)  # block scales opt in
    assert _fp8_swap._parse("0") == frozenset()
    assert _fp8_swap._parse(" direct1, plan2,block ") == {"direct1", "plan2", "block"}
    with pytest.raises(ValueError, match="unknown name"):
        _fp8_swap._parse("direct3")


def test_swap_needs_few_token_rows_and_a_full_weight_side(monkeypatch):
    monkeypatch.setattr(_fp8_swap, "SWAPPED", frozenset({"plan1"}))
    assert _fp8_swap.swap_ab("plan1", 32, 64, False)
    assert not _fp8_swap.swap_ab("plan1", 64, 128, False)  # a native wgmma already
    assert not _fp8_swap.swap_ab("plan1", 16, 32, False)  # too few weight rows for its 64
    assert not _fp8_swap.swap_ab("plan2", 16, 64, False)  # switched off
    # Block-scaled weights: the plan GEMMs' 16-row tiles only, unless `block` is on.
    assert _fp8_swap.swap_ab("plan1", 16, 64, True)
    assert not _fp8_swap.swap_ab("plan1", 32, 64, True)
    monkeypatch.setattr(_fp8_swap, "SWAPPED", frozenset({"plan1", "direct1", "block"}))
    assert _fp8_swap.swap_ab("plan1", 32, 64, True)
    assert _fp8_swap.swap_ab("direct1", 16, 64, True)


def test_stage_rule(monkeypatch):
    monkeypatch.setattr(_fp8_swap, "_STAGES", "rule")
    assert _fp8_swap.swapped_stages(4, 16) == 3  # the unswapped GEMM's shared memory
    assert _fp8_swap.swapped_stages(4, 32) == 4  # a long K loop keeps its depth
    assert _fp8_swap.swapped_stages(3, 8) == 3  # not under 3
    monkeypatch.setattr(_fp8_swap, "_STAGES", "fewer")
    assert _fp8_swap.swapped_stages(3, 64) == 2


@pytest.mark.interpreter
@pytest.mark.parametrize("config,expect", [
    (direct(32, 128, 64, 128), {"direct1": False, "direct2": False}),
    (plan(16, 128, 128, 64, 128), {"plan1": True, "plan2": True}),
    (plan(32, 128, 128, 64, 128), {"plan1": False, "plan2": False}),
], ids=["direct", "plan-16", "plan-32"])
def test_block_scaled_swaps_where_measured_faster_interpreter(monkeypatch, swap_decisions,
                                                              config, expect):
    # The shipped switch ("1"): block-scaled weights swap in the plan's 16-row tiles only;
    # per-channel ones wherever the tile allows.
    monkeypatch.setattr(_fp8_swap, "SWAPPED", _fp8_swap._parse("1"))
    for scheme in ("fp8_block", "fp8_channel"):
        swap_decisions.clear()
        case = make_case(scheme, 6, 4, 2, 256, 128, dtype=torch.float32)
        out, expected = run_triton(*case, config=config)
        assert_close(out, expected, KERNEL_TOL, name=scheme)
        assert dict(swap_decisions) == {gemm: expect[gemm] or scheme == "fp8_channel"
                                        for gemm in expect}


# Shapes of the presets' decode cells (fewer experts): K as long as the layers' own, where
# wgmma's reduced-precision sums would show (`moekit._fp8_swap`, PROMOTE_K).
GPU_CASES = [
    # (E, k, H, I, activation, bias, M): the heuristic's tiles
    (16, 8, 2048, 768, "silu", False, 1),  # qwen3: direct path
    (16, 8, 2048, 768, "silu", False, 4),
    (16, 8, 2048, 768, "silu", False, 24),  # plan path, 32-row tiles
    (8, 2, 4096, 1024, "silu", False, 3),  # mixtral (8 experts): plan path, 16-row tiles
    (32, 4, 2880, 512, "swigluoai", True, 2),  # gpt-oss-like: biases
]


@pytest.mark.gpu
@pytest.mark.parametrize("on", [True, False], ids=["swapped", "unswapped"])
@pytest.mark.parametrize("scheme", ["fp8_tensor", "fp8_channel", "fp8_block", STATIC])
@pytest.mark.parametrize("E,k,H,I,act,bias,M", GPU_CASES)
def test_swapped_gemms_at_preset_depths_gpu(monkeypatch, swap_decisions, on, scheme, E, k, H,
                                            I, act, bias, M):
    monkeypatch.setattr(_fp8_swap, "SWAPPED", EVERYTHING if on else frozenset())
    case = make_case(scheme, M, E, k, H, I, act, bias=bias, dtype=torch.bfloat16,
                     device="cuda", seed=M)
    out, expected = run_triton(*case, act=act)
    assert_close(out, expected, GPU_TOL, name=f"{scheme} M={M} swapped={on}")
    assert any(swapped for _, swapped in swap_decisions) == on


@pytest.mark.gpu
@pytest.mark.parametrize("on", [True, False], ids=["swapped", "unswapped"])
@pytest.mark.parametrize("scheme,M,E,k,H,I,act,bias,dtype,config,swapped,why", CASES)
def test_swapped_gemms_match_quantised_reference_gpu(monkeypatch, swap_decisions, on, scheme,
                                                     M, E, k, H, I, act, bias, dtype, config,
                                                     swapped, why):
    monkeypatch.setattr(_fp8_swap, "SWAPPED", EVERYTHING if on else frozenset())
    case = make_case(scheme, M, E, k, H, I, act, bias=bias, dtype=torch.bfloat16,
                     device="cuda")
    out, expected = run_triton(*case, act=act, config=config)
    assert_close(out, expected, TINY_CASE_TOL, name=why)
    assert sorted(swap_decisions) == sorted((gemm, on) for gemm in swapped)
