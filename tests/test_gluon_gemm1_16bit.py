"""The 16-bit Gluon GEMM1 (`moekit._gluon_gemm1_16bit`): when it is chosen, and on an sm_90
GPU the bf16/fp16 layer with it against the reference and against the Triton GEMM1.

The kernel itself only runs on Hopper (Gluon has no interpreter for wgmma/TMA); its
sm_90 compile (no spills, shared memory) is in tests/test_sm90_compile.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit
import moekit._gluon
import moekit._gluon_gemm1_16bit
import moekit.experts
from helpers import (
    assert_close,
    check_graph_replay_with_new_routing,
    check_reruns_bitwise,
    count_calls,
    cuda_layer_case,
    float32_reference,
    poison_,
    poison_cuda_cache,
)
from moekit._gluon import DISABLE_ENV
from moekit._gluon_gemm1_16bit import MAX_HIDDEN, gluon_gemm1_16bit, use_gluon_gemm1_16bit
from moekit.tuning.heuristic import tiles_for_block_m

# The two GEMM1s sum the same products in the same K order through the same MMA shape,
# but each rounds `inter` to 16 bits after its own epilogue arithmetic; a plumbing bug
# (row, expert, column tile, stage) costs far more than this.
TRITON_AGREEMENT = 2e-3


def _chosen(x, w, block_m=128, activation="silu"):
    return use_gluon_gemm1_16bit(x, w, block_m, activation)


def test_shape_rules(monkeypatch):
    # The predicate's own rules, on the CPU: the device check (`gluon_allowed`: an sm_90
    # GPU, Gluon present, not switched off) answers yes here.
    monkeypatch.setattr(moekit._gluon_gemm1_16bit, "gluon_allowed", lambda t: True)
    w13 = torch.empty(4, 512, 256, dtype=torch.bfloat16)  # I = 256
    hidden = torch.empty(8, 256, dtype=torch.bfloat16)
    assert _chosen(hidden, w13)
    assert _chosen(hidden.half(), w13.half()), "fp16"
    assert _chosen(hidden, w13, activation="swigluoai")
    assert not _chosen(hidden, w13, block_m=64), "64-row tiles: the Triton kernel"
    assert not _chosen(hidden, w13, activation="relu2"), "ungated"
    assert not _chosen(hidden, w13[:, :416].contiguous()), "I = 208: partial column tiles"
    assert not _chosen(torch.empty(8, 200, dtype=torch.bfloat16),
                       w13[..., :200].contiguous()), "H = 200: 16 | H"
    for h in (MAX_HIDDEN, MAX_HIDDEN + 16):
        wide = torch.empty(4, 512, h, dtype=torch.bfloat16)
        x = torch.empty(8, h, dtype=torch.bfloat16)
        assert _chosen(x, wide) == (h <= MAX_HIDDEN), f"H = {h}: MAX_HIDDEN"
    assert not _chosen(hidden.half(), w13), "mixed dtypes"
    assert not _chosen(hidden.float(), w13.float()), "fp32"
    assert not _chosen(hidden, w13.to(torch.float8_e4m3fn)), "fp8 has its own kernel"
    assert not _chosen(hidden, w13[:, :256]), "w13 not contiguous"
    assert not _chosen(torch.empty(256, 16, dtype=torch.bfloat16).t(), w13), (
        "hidden not contiguous")
    shifted = torch.empty(hidden.numel() + 1, dtype=hidden.dtype)[1:]
    assert not _chosen(shifted.view(hidden.shape), w13), "base not 16-byte aligned"


def test_partial_column_tiles_are_left_to_triton_and_refused(monkeypatch):
    # I not a multiple of 128 (gpt-oss's 2880) runs Triton's GEMM1 (the Gluon one on
    # partial column tiles measured 0.77–1.00×, bench/NOTES.md session 52), and the
    # launcher refuses such an I outright rather than launch tiles it cannot fill.
    monkeypatch.setattr(moekit._gluon_gemm1_16bit, "gluon_allowed", lambda t: True)
    hidden = torch.empty(8, 256, dtype=torch.bfloat16)
    for inter_size in (208, 2880):
        w13 = torch.empty(4, 2 * inter_size, 256, dtype=torch.bfloat16)
        assert not _chosen(hidden, w13), f"I = {inter_size}"
        with pytest.raises(ValueError, match=f"I = {inter_size}: expected whole column tiles"):
            gluon_gemm1_16bit(hidden, w13, None, torch.empty(8), None, "silu", 1.0, 0.0,
                              False, 132)


def test_chosen_only_on_an_sm90_gpu(monkeypatch):
    w13 = torch.empty(4, 512, 256, dtype=torch.bfloat16)
    hidden = torch.empty(8, 256, dtype=torch.bfloat16)
    assert not _chosen(hidden, w13), "CPU tensors"
    if not torch.cuda.is_available():
        return
    w13, hidden = w13.cuda(), hidden.cuda()
    assert _chosen(hidden, w13) == (torch.cuda.get_device_capability() == (9, 0))
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert not _chosen(hidden, w13), "switched off"


# ---------------------------------------------------------------------------- GPU


@pytest.fixture
def gemm1_calls(monkeypatch):
    """Counts the layer's calls of the Gluon GEMM1, so a test knows it ran."""
    return count_calls(monkeypatch, moekit.experts, "gluon_gemm1_16bit")


def _require_gluon():
    w13 = torch.empty(1, 256, 128, dtype=torch.bfloat16, device="cuda")
    if not use_gluon_gemm1_16bit(torch.empty(1, 128, dtype=torch.bfloat16, device="cuda"),
                                 w13, 128, "silu"):
        pytest.skip("the Gluon GEMM1 needs an sm_90 GPU and Triton's Gluon")


@pytest.mark.gpu
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("M,E,k,H,I,dtype,act,bias,on_input,skew", [
    (2048, 8, 2, 1024, 512, torch.bfloat16, "silu", False, False, 0.0),  # whole tiles
    (1000, 16, 4, 768, 384, torch.bfloat16, "swigluoai", True, False, 3.0),  # odd tails
    (300, 32, 8, 528, 256, torch.float16, "gelu", False, True, 0.0),  # partial K step
    (700, 16, 6, 1024, 1408, torch.bfloat16, "gelu_tanh", True, True, 1.0),  # 11 col tiles
])
def test_layer_with_the_gluon_gemm1_gpu(tail, M, E, k, H, I, dtype, act, bias, on_input, skew,
                                        gemm1_calls, monkeypatch):
    _require_gluon()
    hidden, w13, w2, b13, b2, ids, weights = cuda_layer_case(M, E, k, H, I, dtype, bias, skew)
    config = dataclasses.replace(tiles_for_block_m(128), tail_block_m=64 if tail else 0)
    outs = {}
    for name, env in (("gluon", "1"), ("triton", "0")):
        monkeypatch.setenv(DISABLE_ENV, env)
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        moekit.fused_experts(hidden, w13, w2, ids, weights, activation=act, b13=b13, b2=b2,
                             apply_router_weight_on_input=on_input, config=config, out=out)
        outs[name] = out
    assert len(gemm1_calls) == 1, "the Gluon GEMM1 ran once, the control not"
    expected = float32_reference(hidden, w13, w2, b13, b2, ids, weights, act, on_input)
    assert_close(outs["gluon"], expected, name=f"{dtype} tail={tail}")
    assert_close(outs["gluon"], outs["triton"], TRITON_AGREEMENT, name="against Triton's")


@pytest.mark.gpu
def test_gluon_gemm1_replays_in_a_cuda_graph_with_new_routing_gpu(gemm1_calls):
    _require_gluon()
    check_graph_replay_with_new_routing(1024, 32, 8, 1024, 512, tiles_for_block_m(128))
    assert gemm1_calls, "captured through the Gluon GEMM1"


@pytest.mark.gpu
def test_gluon_gemm1_is_deterministic_gpu():
    _require_gluon()
    check_reruns_bitwise(4096, 64, 8, 2048, 1024, tiles_for_block_m(128))


@pytest.mark.gpu
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("M,E,k,H,I,dtype,act,bias,on_input,skew", [
    (1000, 16, 4, 768, 384, torch.bfloat16, "swigluoai", True, False, 3.0),  # odd tails
    (300, 32, 8, 528, 256, torch.float16, "gelu", False, True, 0.0),  # partial K step
])
def test_layer_with_narrow_column_tiles_gpu(tail, M, E, k, H, I, dtype, act, bias, on_input,
                                            skew, gemm1_calls, monkeypatch):
    # The Gluon GEMM1 at 64 gate + 64 up columns per tile (a tail's 32 per warpgroup),
    # against the reference and bitwise against its 128-column tiles (same K order).
    _require_gluon()
    hidden, w13, w2, b13, b2, ids, weights = cuda_layer_case(M, E, k, H, I, dtype, bias, skew)
    config = dataclasses.replace(tiles_for_block_m(128), tail_block_m=64 if tail else 0)
    outs = {}
    for narrow in (True, False):  # the rule's answer forced
        monkeypatch.setattr(moekit.experts, "gluon_gemm1_narrow_columns",
                            lambda *args, narrow=narrow: narrow)
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        moekit.fused_experts(hidden, w13, w2, ids, weights, activation=act, b13=b13, b2=b2,
                             apply_router_weight_on_input=on_input, config=config, out=out)
        outs[narrow] = out
    column_tiles = [args[-1] for args in gemm1_calls]  # launch_gemm1 passes block_n last
    assert len(gemm1_calls) == 2 and column_tiles == [moekit._gluon_gemm1_16bit.NARROW_N,
                                                      moekit._gluon_gemm1_16bit.BLOCK_N]
    expected = float32_reference(hidden, w13, w2, b13, b2, ids, weights, act, on_input)
    assert_close(outs[True], expected, name=f"{dtype} tail={tail} narrow columns")
    assert torch.equal(outs[True], outs[False]), "narrow against wide column tiles"
