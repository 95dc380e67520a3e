"""The Gluon GEMM2 (`moekit._gluon_gemm2`): when it is chosen, the combine through
`pair_slots` that reads its plan-order rows, and on an sm_90 GPU the fp8 layer with the
Gluon GEMMs (GEMM2's, and GEMM1's where it applies) against the quantised reference and
against the Triton GEMMs.

The kernel itself only runs on Hopper (Gluon has no interpreter for wgmma/TMA); its
sm_90 compile (no spills, shared memory) is in tests/test_sm90_compile.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit
import moekit._gluon
import moekit._gluon_gemm2
import moekit.experts_fp8
from helpers import (
    assert_close,
    capture_cuda_graph,
    count_calls,
    outputs_both_ways,
    poison_,
    poison_cuda_cache,
    random_routing,
)
from moekit._gluon import DISABLE_ENV, GEMM2_GROUP_M_ENV
from moekit._gluon_gemm2 import column_halves, use_gluon_gemm2
from moekit.experts import launch_combine
from moekit.experts_fp8 import plan_fp8_config
from moekit.quant import QuantScheme
from moekit.reference import fused_experts_quantized
from test_experts_fp8 import make_case

GPU_TOL = 1e-2  # DESIGN.md's bound for bf16 outputs
# Gluon against Triton for both GEMMs: GEMM2 alone differs in summation order only, but
# with the Gluon GEMM1 (per-tensor, per-channel, static schemes) GEMM2's fp8 input differs
# in a few roundings too — as tests/test_gluon_gemm1.py's bound.
TRITON_AGREEMENT = 8e-3


@pytest.mark.interpreter
@pytest.mark.parametrize("M,E,k,H,drop", [
    (5, 4, 2, 96, False),  # ragged H against the 1024-wide column block
    (33, 8, 3, 64, True),  # dropped pairs (id −1) must be skipped, not read
])
def test_combine_reads_plan_order_rows_through_pair_slots(M, E, k, H, drop, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ids, weights = random_routing(M, E, k, seed=M)
    if drop:
        ids[::3, 0] = -1
    plan = moekit.dispatch_plan(ids, E, 16, backend="triton")
    plan_rows = torch.randn(plan.capacity, H)  # [capacity, H]: padding rows hold noise too
    out = poison_(torch.empty(M, H))
    launch_combine(plan_rows, ids, E, out, pair_slots=plan.pair_slots)
    valid = (ids >= 0).reshape(-1)
    pair_rows = plan_rows[plan.pair_slots.long()] * valid[:, None]  # [M*k, H]
    expected = pair_rows.reshape(M, k, H).sum(1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_gluon_gemm2_shape_rules(monkeypatch):
    # The predicate's own rules, on the CPU: the device check (`gluon_allowed`: an sm_90
    # GPU, Gluon present, not switched off) answers yes here.
    monkeypatch.setattr(moekit._gluon_gemm2, "gluon_allowed", lambda t: True)
    w2 = torch.empty(4, 256, 512, dtype=torch.float8_e4m3fn)
    assert use_gluon_gemm2(w2, 128, [128])
    assert not use_gluon_gemm2(w2, 64, [128]), "64-row tiles: the Triton kernel"
    assert not use_gluon_gemm2(w2, 128, [32]), "scale groups finer than a K step"
    assert use_gluon_gemm2(w2[:, :208].contiguous(), 128, []), "a partial column tile"
    assert not use_gluon_gemm2(w2[:, :200].contiguous(), 128, []), "H: not 16-byte rows"
    assert not use_gluon_gemm2(w2[:, :, :200].contiguous(), 128, []), "I: not 16-byte rows"
    assert not use_gluon_gemm2(w2[:, :128], 128, []), "not contiguous"
    assert not use_gluon_gemm2(w2.to(torch.bfloat16), 128, []), "16-bit: its own kernel"
    shifted = torch.empty(w2.numel() + 8, dtype=w2.dtype)[8:].view(w2.shape)
    assert not use_gluon_gemm2(shifted, 128, []), "base not 16-byte aligned"


def test_gluon_gemm2_needs_an_sm90_gpu(monkeypatch):
    w2 = torch.empty(4, 256, 512, dtype=torch.float8_e4m3fn)
    assert not use_gluon_gemm2(w2, 128, [128]), "a CPU tensor"
    if not torch.cuda.is_available():
        return
    w2 = w2.cuda()
    assert use_gluon_gemm2(w2, 128, [128]) == (torch.cuda.get_device_capability() == (9, 0))
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert not use_gluon_gemm2(w2, 128, [128]), "switched off"


def test_gemm2_tiles_are_two_halves_wide_only_where_they_fit(monkeypatch):
    # Two 128-column halves per tile: H a multiple of 256, a 16-bit output (float32 boxes
    # overflow shared memory), per-K weight scales only one per half and without biases
    # (else they spill into the K loop).
    monkeypatch.setattr(moekit._gluon_gemm2, "WIDE_PER_K_WEIGHTS", True)
    assert column_halves(2048, False, False, True, torch.bfloat16) == 2
    assert column_halves(7168, False, False, False, torch.float16) == 2
    assert column_halves(1152, False, False, False, torch.bfloat16) == 1, "4.5 wide tiles"
    assert column_halves(2048, False, False, False, torch.float32) == 1, "float32 output"
    assert column_halves(2048, True, True, False, torch.bfloat16) == 2, "block scales"
    assert column_halves(2048, True, True, True, torch.bfloat16) == 1, "block, biases"
    assert column_halves(2048, True, False, False, torch.bfloat16) == 1, "per-K vectors"
    assert column_halves(1152, True, True, False, torch.bfloat16) == 1
    monkeypatch.setattr(moekit._gluon_gemm2, "WIDE_PER_K_WEIGHTS", False)
    assert column_halves(2048, True, True, False, torch.bfloat16) == 1, "switched off"
    assert column_halves(2048, False, False, False, torch.bfloat16) == 2


def test_descriptors_see_weights_and_rows_as_row_major_matrices():
    # The launcher reads the base's address and the descriptor's own shape and strides:
    # [E, N, K] weights as [E·N, K], a 2-D tensor's row stride kept, the box layout chosen
    # by dtype and box.
    import moekit._gluon as module

    if not module.HAVE_GLUON:
        pytest.skip("needs Triton's Gluon")
    w = torch.empty(4, 256, 512, dtype=torch.float8_e4m3fn)
    d = module.descriptor(w, [128, 128])
    assert (d.base.data_ptr(), list(d.shape), list(d.strides)) == (w.data_ptr(), [1024, 512],
                                                                    [512, 1])
    assert list(d.block_shape) == [128, 128] and d.layout.swizzle_byte_width == 128
    rows = torch.empty(64, 1024, dtype=torch.bfloat16)[:, :768]  # a row stride of 1024
    d = module.descriptor(rows, [64, 64])
    assert (list(d.shape), list(d.strides)) == ([64, 768], [1024, 1])
    assert d.layout.element_bitwidth == 16
    with pytest.raises(ValueError, match="16-byte aligned"):
        module.descriptor(torch.empty(4, 256, 512, dtype=torch.float8_e4m3fn)[:, :, 1:], [128, 128])


def test_gluon_is_off_with_an_older_triton(monkeypatch):
    # Gluon's Hopper API moved between releases; only the measured Triton (3.6) takes it.
    import importlib

    import triton

    import moekit._gluon as module

    monkeypatch.setattr(triton, "__version__", "3.5.1")
    try:
        assert not importlib.reload(module).HAVE_GLUON
        w = torch.empty(4, 256, 512, dtype=torch.float8_e4m3fn)
        assert not module.gluon_allowed(w)
    finally:
        monkeypatch.undo()
        importlib.reload(module)
    assert module.HAVE_GLUON


# ---------------------------------------------------------------------------- GPU

GPU_SCHEMES = ["fp8_tensor", "fp8_channel", "fp8_block", QuantScheme.fp8_tensor(dynamic=False)]


def prefill_case(scheme, M, E, k, H, I, *, bias, skew, seed=0):
    """fp8 experts, bf16 tokens and routing on the GPU (static schemes calibrated on the
    routed pairs, as in tests/test_experts_fp8.py)."""
    return make_case(scheme, M, E, k, H, I, bias=bias, dtype=torch.bfloat16, device="cuda",
                     skew=skew, seed=seed)


def require_gluon(w2):
    if not use_gluon_gemm2(w2, 128, []):
        pytest.skip("the Gluon GEMM2 needs an sm_90 GPU and Triton's Gluon")


@pytest.mark.gpu
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("scheme", GPU_SCHEMES)
@pytest.mark.parametrize("M,E,k,H,I,bias,skew", [
    (2048, 8, 2, 1024, 512, False, 0.0),  # 512 rows per expert: whole 128-row tiles
    (1000, 16, 4, 768, 384, True, 3.0),  # skewed: runs with odd 64-row tails; biases
    (300, 32, 8, 512, 1360, False, 0.0),  # I not a multiple of 128 (TMA zero-fills K)
    # H and I not multiples of 128 (gpt-oss's 2880): a partial last column tile, biases
    (1000, 16, 4, 336, 208, True, 3.0),
])
def test_fp8_prefill_with_the_gluon_gemm2_gpu(scheme, tail, M, E, k, H, I, bias, skew,
                                             monkeypatch):
    scheme, hidden, q13, q2, ids, weights, b13, b2 = prefill_case(
        scheme, M, E, k, H, I, bias=bias, skew=skew)
    require_gluon(q2.q)
    config = plan_fp8_config(4096, E, k, scheme)  # 128-row tiles at any M
    config = dataclasses.replace(config, tail_block_m=64 if tail else 0)
    ids[::7, -1] = -1  # dropped pairs
    calls = count_calls(monkeypatch, moekit.experts_fp8, "gluon_gemm2")
    outs = {}
    for name, env in (("gluon", "1"), ("triton", "0")):
        monkeypatch.setenv("MOEKIT_GLUON", env)
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme, b13=b13, b2=b2,
                                 config=config, out=out)
        outs[name] = out
    assert len(calls) == 1, "the Gluon GEMM2 runs, the control not"
    expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme, b13=b13,
                                       b2=b2)
    assert_close(outs["gluon"], expected, GPU_TOL, name=f"{scheme} tail={tail}")
    assert_close(outs["gluon"], outs["triton"], TRITON_AGREEMENT, name="against Triton's")


@pytest.mark.gpu
def test_cuda_graph_replay_with_the_gluon_gemm2_gpu():
    # New routing on every replay: the work list's length and the tiles are read on the GPU.
    E, k, H, I, M = 16, 4, 512, 256, 1024
    scheme, hidden, q13, q2, ids, weights, b13, b2 = prefill_case(
        "fp8_block", M, E, k, H, I, bias=True, skew=0.0)
    require_gluon(q2.q)
    config = plan_fp8_config(4096, E, k, scheme)
    call = lambda: moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme,
                                            b13=b13, b2=b2, config=config)
    graph, out = capture_cuda_graph(call)
    for seed in (1, 2):
        new_ids, new_weights = random_routing(M, E, k, device="cuda", seed=seed, skew=4.0 * seed)
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        out.fill_(float("nan"))
        graph.replay()
        expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme,
                                           b13=b13, b2=b2)
        assert_close(out, expected, GPU_TOL, name=f"replay {seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["fp8_tensor", "fp8_block"])
@pytest.mark.parametrize("group,tail", [(3, True), (8, False)])
def test_grouped_tile_order_changes_no_value_gpu(scheme, group, tail, monkeypatch):
    # Skewed routing over 4 experts: runs of several row tiles, odd 64-row tails, groups
    # that cross experts and a partial last group; 5 column tiles of 256 (H = 1280).
    M, E, k, H, I = 1024, 4, 2, 1280, 512
    scheme, hidden, q13, q2, ids, weights, b13, b2 = prefill_case(
        scheme, M, E, k, H, I, bias=True, skew=2.0)
    require_gluon(q2.q)
    config = dataclasses.replace(plan_fp8_config(4096, E, k, scheme),
                                 tail_block_m=64 if tail else 0)
    calls = count_calls(monkeypatch, moekit.experts_fp8, "gluon_gemm2")
    outs = {}
    for order, rows in (("row major", 1), ("grouped", group)):
        monkeypatch.setenv(GEMM2_GROUP_M_ENV, str(rows))
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme, b13=b13, b2=b2,
                                 config=config, out=out)
        outs[order] = out
    assert len(calls) == 2, "the Gluon GEMM2 ran in both orders"
    assert torch.equal(outs["grouped"], outs["row major"]), "the order moved a value"
    expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme, b13=b13,
                                       b2=b2)
    assert_close(outs["grouped"], expected, GPU_TOL, name=f"{scheme} group {group}")


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["fp8_tensor", "fp8_block"])
@pytest.mark.parametrize("prefetch,tail", [(True, True), (False, True), (True, False)])
def test_expert_groups_change_no_value_gpu(scheme, prefetch, tail, monkeypatch):
    # The grouped order in groups that never span two experts (`EXPERT_GROUPS`, groups of
    # 3 here, so an expert's run splits into several): the same bits as GROUP_M's order,
    # the tile's indices loaded at its start or a tile ahead (the three index loads of the
    # order then in `prefetch_entry` too), with and without tail tiles.
    monkeypatch.setenv(GEMM2_GROUP_M_ENV, "3")
    _check_switch_changes_no_value("EXPERT_GROUPS", scheme, prefetch, tail, monkeypatch,
                                   "the expert groups")


def _check_switch_changes_no_value(switch, scheme, prefetch, tail, monkeypatch, what):
    """The fp8 layer with `moekit._gluon.<switch>` on and off, on skewed routing over 4
    experts (odd 64-row tails with `tail`), the producers' prefetch as given: the Gluon
    GEMM2 ran both ways, the outputs are the same bits, and they match the oracle."""
    M, E, k, H, I = 1000, 4, 2, 1280, 512
    scheme, hidden, q13, q2, ids, weights, b13, b2 = prefill_case(
        scheme, M, E, k, H, I, bias=True, skew=2.0)
    require_gluon(q2.q)
    config = dataclasses.replace(plan_fp8_config(4096, E, k, scheme),
                                 tail_block_m=64 if tail else 0)
    monkeypatch.setattr(moekit._gluon, "PREFETCH_TILES_FP8", prefetch)
    calls = count_calls(monkeypatch, moekit.experts_fp8, "gluon_gemm2")
    outs = outputs_both_ways(monkeypatch, moekit._gluon, switch, lambda: (
        moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme, b13=b13, b2=b2,
                                 config=config, out=poison_(torch.empty_like(hidden)))))
    assert len(calls) == 2, "the Gluon GEMM2 ran both ways"
    assert torch.equal(outs[True], outs[False]), f"{what} moved a value"
    expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme, b13=b13,
                                       b2=b2)
    assert_close(outs[True], expected, GPU_TOL, name=f"{scheme} {what}")


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch,tail", [(True, True), (False, True), (True, False)])
def test_block_scales_on_two_half_tiles_change_no_value_gpu(prefetch, tail, monkeypatch):
    # Block scales on 256-column tiles (`column_halves`; router weights after the K loop, a
    # tail the first warpgroup's alone) against one-half tiles: each half's products,
    # scales and sums are the same, so the same bits; skewed routing over 4 experts (odd
    # 64-row tails with `tail`), dropped pairs, no biases (those keep one half).
    M, E, k, H, I = 1000, 4, 2, 1280, 640
    scheme, hidden, q13, q2, ids, weights, b13, b2 = prefill_case(
        "fp8_block", M, E, k, H, I, bias=False, skew=2.0)
    require_gluon(q2.q)
    ids[::7, -1] = -1
    config = dataclasses.replace(plan_fp8_config(4096, E, k, scheme),
                                 tail_block_m=64 if tail else 0)
    monkeypatch.setattr(moekit._gluon, "PREFETCH_TILES_FP8", prefetch)
    halves = []
    real = moekit._gluon_gemm2.column_halves
    monkeypatch.setattr(moekit._gluon_gemm2, "column_halves",
                        lambda *args: halves.append(real(*args)) or halves[-1])
    outs = outputs_both_ways(monkeypatch, moekit._gluon_gemm2, "WIDE_PER_K_WEIGHTS", lambda: (
        moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme, config=config,
                                 out=poison_(torch.empty_like(hidden)))))
    assert halves == [1, 2], "one half, then two"
    assert torch.equal(outs[True], outs[False]), "two halves moved a value"
    expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme)
    assert_close(outs[True], expected, GPU_TOL, name="block scales, two halves")
