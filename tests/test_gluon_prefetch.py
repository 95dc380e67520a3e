"""The Gluon GEMMs loading a tile's indices a tile ahead (`moekit._gluon.PREFETCH_TILES`,
on for the 16-bit kernels; `PREFETCH_TILES_FP8`, off by default for the fp8 ones' producers,
tested on here): the same values as loading them at the tile's start.

A prefetch carries the next tile's expert, first slot and pairs (GEMM1 gathering A) and
the one after's work entry through the tile loop, clamped past a program's last tile; a
stale or off-by-one carry would put a tile's rows or weights under another tile's
coordinates. So: three programs running every tile (many carries each, tails back to
back), and the full grid, each bitwise equal with the prefetch off and close to the
reference. sm_90 only; the compile (no spills) is in tests/test_sm90_compile.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit
import moekit._gluon_gemm1
import moekit.experts
import moekit.experts_fp8
from helpers import (
    assert_close,
    count_calls,
    cuda_layer_case,
    float32_reference,
    poison_,
    poison_cuda_cache,
)
from moekit import _gluon
from moekit._gluon_gemm1 import use_gluon_gemm1
from moekit._gluon_gemm1_16bit import use_gluon_gemm1_16bit
from moekit.experts_fp8 import plan_fp8_config
from moekit.quant.scheme import FULL
from moekit.reference import fused_experts_quantized
from moekit.tuning.heuristic import tiles_for_block_m
from test_experts_fp8 import GPU_TOL, make_case


def _require_gluon():
    x = torch.empty(1, 128, dtype=torch.bfloat16, device="cuda")
    w16 = torch.empty(1, 256, 128, dtype=torch.bfloat16, device="cuda")
    w8 = torch.empty(1, 256, 128, dtype=torch.float8_e4m3fn, device="cuda")
    if not (use_gluon_gemm1_16bit(x, w16, 128, "silu")
            and use_gluon_gemm1(w8, 128, "silu", FULL, (FULL, FULL), 128, False)):
        pytest.skip("the Gluon GEMMs need an sm_90 GPU and Triton's Gluon")


def _runs(monkeypatch, module, flag, call):
    """`call()` with the prefetch (`_gluon.<flag>`) on and off, on the full grid and on 3
    programs: {(prefetch, programs): out}."""
    outs = {}
    for programs in (None, 3):
        if programs:
            monkeypatch.setattr(module, "persistent_programs", lambda device: 3)
        for prefetch in (True, False):
            monkeypatch.setattr(_gluon, flag, prefetch)
            out = call()
            outs[(prefetch, programs)] = out
    return outs


@pytest.mark.gpu
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("M,E,k,H,I,act,bias,on_input,skew", [
    (1000, 16, 4, 768, 384, "swigluoai", True, False, 3.0),  # odd tails, biases
    (700, 32, 6, 512, 256, "silu", False, True, 1.0),  # weight on the input
])
def test_16bit_prefetch_changes_no_value_gpu(tail, M, E, k, H, I, act, bias, on_input, skew,
                                            monkeypatch):
    _require_gluon()
    gemm1 = count_calls(monkeypatch, moekit.experts, "gluon_gemm1_16bit")
    gemm2 = count_calls(monkeypatch, moekit.experts, "gluon_gemm2_16bit")
    hidden, w13, w2, b13, b2, ids, weights = cuda_layer_case(M, E, k, H, I, torch.bfloat16,
                                                             bias, skew)
    config = dataclasses.replace(tiles_for_block_m(128), tail_block_m=64 if tail else 0)

    def call():
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        return moekit.fused_experts(hidden, w13, w2, ids, weights, activation=act, b13=b13,
                                    b2=b2, apply_router_weight_on_input=on_input,
                                    config=config, out=out)
    outs = _runs(monkeypatch, moekit.experts, "PREFETCH_TILES", call)
    assert len(gemm1) == len(gemm2) == 4, "both Gluon GEMMs ran in every call"
    expected = float32_reference(hidden, w13, w2, b13, b2, ids, weights, act, on_input)
    assert_close(outs[(True, 3)], expected, name=f"tail={tail} prefetch, 3 programs")
    for key, out in outs.items():
        assert torch.equal(out, outs[(False, None)]), f"prefetch, programs = {key}"


def fp8_tail_tile_case(scheme: str, device: str = "cuda"):
    """A skewed bf16 fp8 layer (M = 1000, 32 experts, top 4, H = 768, I = 384) and a
    prefill config with 64-row tail tiles, where both Gluon GEMMs run: (scheme, hidden,
    q13, q2, ids, weights, config)."""
    M, E, k, H, I = 1000, 32, 4, 768, 384
    scheme, hidden, q13, q2, ids, weights, _, _ = make_case(
        scheme, M, E, k, H, I, "silu", bias=False, dtype=torch.bfloat16, device=device,
        skew=3.0)
    config = dataclasses.replace(plan_fp8_config(4096, E, k, scheme), tail_block_m=64)
    return scheme, hidden, q13, q2, ids, weights, config


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,gather", [("fp8_tensor", True), ("fp8_block", False)])
def test_fp8_prefetch_changes_no_value_gpu(scheme, gather, monkeypatch):
    # Gathering A, GEMM1's producer prefetches the slots' pairs; in plan order (block
    # scales along K never gather) only the first slot.
    _require_gluon()
    monkeypatch.setattr(moekit._gluon_gemm1, "GATHER_MIN_TOP_K", 1 if gather else 10**9)
    gemm1 = count_calls(monkeypatch, moekit.experts_fp8, "gluon_gemm1")
    gemm2 = count_calls(monkeypatch, moekit.experts_fp8, "gluon_gemm2")
    scheme, hidden, q13, q2, ids, weights, config = fp8_tail_tile_case(scheme)

    def call():
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        return moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme,
                                        activation="silu", config=config, out=out)
    outs = _runs(monkeypatch, moekit.experts_fp8, "PREFETCH_TILES_FP8", call)
    assert len(gemm1) == len(gemm2) == 4, "both Gluon GEMMs ran in every call"
    expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme,
                                       activation="silu")
    assert_close(outs[(True, 3)], expected, GPU_TOL, name=f"{scheme} prefetch, 3 programs")
    for key, out in outs.items():
        assert torch.equal(out, outs[(False, None)]), f"prefetch, programs = {key}"


@pytest.mark.gpu
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("fp8", [False, True])
def test_prefetch_with_every_pair_dropped_gpu(tail, fp8, monkeypatch):
    # No row tile at all (an expert-parallel rank that got no tokens): the prefetch before
    # the first tile must load only valid indices, and every output row is zero.
    _require_gluon()
    M, E, k, H, I = 300, 16, 4, 512, 256
    monkeypatch.setattr(_gluon, "PREFETCH_TILES_FP8", True)
    if fp8:
        gemm1 = count_calls(monkeypatch, moekit.experts_fp8, "gluon_gemm1")
        scheme, hidden, q13, q2, ids, weights, _, _ = make_case(
            "fp8_tensor", M, E, k, H, I, "silu", bias=False, dtype=torch.bfloat16,
            device="cuda")
        config = plan_fp8_config(4096, E, k, scheme)
    else:
        gemm1 = count_calls(monkeypatch, moekit.experts, "gluon_gemm1_16bit")
        hidden, q13, q2, _, _, ids, weights = cuda_layer_case(M, E, k, H, I, torch.bfloat16,
                                                              False, 0.0)
        config = tiles_for_block_m(128)
    config = dataclasses.replace(config, tail_block_m=64 if tail else 0)
    ids.fill_(-1)
    for programs in (None, 3):
        if programs:
            monkeypatch.setattr(moekit.experts_fp8 if fp8 else moekit.experts,
                                "persistent_programs", lambda device: 3)
        out = poison_(torch.empty_like(hidden))
        if fp8:
            moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme,
                                     activation="silu", config=config, out=out)
        else:
            moekit.fused_experts(hidden, q13, q2, ids, weights, activation="silu",
                                 config=config, out=out)
        torch.cuda.synchronize()
        assert torch.equal(out, torch.zeros_like(out)), f"programs = {programs}"
    assert len(gemm1) == 2, "the Gluon GEMM1 ran, over no tile"
