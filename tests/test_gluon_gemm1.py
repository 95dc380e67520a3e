"""The Gluon GEMM1 (`moekit._gluon_gemm1`): the quantiser writing hidden in plan order,
when the kernel is chosen, and on an sm_90 GPU the fp8 layer with it against the
quantised reference and against the Triton GEMM1.

The kernel itself only runs on Hopper (Gluon has no interpreter for wgmma/TMA); its
sm_90 compile (no spills, shared memory) is in tests/test_sm90_compile.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit
import moekit._gluon_gemm1
import moekit.experts_fp8
from helpers import (
    assert_close,
    capture_cuda_graph,
    count_calls,
    poison_,
    poison_cuda_cache,
    random_routing,
    seeded_randn_like,
)
from moekit._fp8_quantize import launch_quantize_rows
from moekit._gluon import DISABLE_ENV, GEMM1_ENV, HOPPER_L2_BYTES
from moekit._gluon_gemm1 import (
    GROUP_M,
    group_m,
    split_up_scales,
    stage_input_scales,
    takes_biases,
    use_gluon_gemm1,
    worker_registers,
)
from moekit.experts_fp8 import _amax_partials, plan_fp8_config
from moekit.quant import QuantScheme, QuantSpec
from moekit.quant.scheme import FULL
from moekit.reference import fused_experts_quantized
from test_experts_fp8 import make_case

GPU_TOL = 1e-2  # DESIGN.md's bound for bf16 outputs
# The two GEMM1s differ in summation order (promotion every 128 against 256 products),
# which flips fp8 roundings of GEMM2's input: each path lies ~4–5e-3 from the reference
# (bench/results/h200-20261202-kernels-fp8_*-prefill-s1{2,3}.md), independently, so up to
# ~7e-3 from each other; a plumbing bug (row, expert, scale) costs ≥ 1e-2.
TRITON_AGREEMENT = 8e-3
_POISON_BYTE = 0x7F  # e4m3fn NaN


@pytest.mark.parametrize("mode,group,M,K,drop", [
    ("static", 1, 7, 96, False),
    ("tensor", 1, 40, 520, True),  # amax partials first (over 16,384 values)
    ("tensor_rows", 1, 5, 64, False),
    ("token", 1, 9, 2100, True),  # a row longer than one 1024-wide block
    ("group", 32, 6, 160, True),  # scales per 1×32 group go to the slots too
    ("group_t", 32, 6, 160, True),  # … written transposed, [groups, capacity rounded to 4]
])
@pytest.mark.interpreter
def test_quantiser_writes_rows_to_their_pairs_plan_slots(mode, group, M, K, drop, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    E, k = 4, 3
    x = torch.randn(M, K, dtype=torch.float16) * 3
    ids, _ = random_routing(M, E, k, seed=M)
    if drop:
        ids[::2, 1] = -1  # dropped pairs have no slot: nothing is written for them
    plan = moekit.dispatch_plan(ids, E, 16, backend="triton")
    transposed = mode == "group_t"
    mode = "group" if transposed else mode
    groups = -(-K // group) if mode == "group" else None
    partials = _amax_partials(x) if mode == "tensor" else None

    def quantise(rows, pair_slots):
        q = torch.full((rows, K), _POISON_BYTE, dtype=torch.uint8).view(torch.float8_e4m3fn)
        if mode == "static":
            scale, stride = torch.tensor([0.02]), 0
        elif mode in ("tensor", "tensor_rows"):
            scale, stride = poison_(torch.empty(1)), 0
        elif mode == "token":
            scale, stride = poison_(torch.empty(rows)), 1
        elif transposed and pair_slots is not None:
            padded = poison_(torch.empty(groups, -(-rows // 4) * 4))
            launch_quantize_rows(x, q, padded, 1, mode, group, partials, pair_slots,
                                 stride_sk=padded.stride(0))
            assert padded[:, rows:].isnan().all(), "the rounding columns stay unwritten"
            return q.view(torch.uint8), padded[:, :rows].t()
        else:
            scale = poison_(torch.empty(rows, groups))
            stride = groups
        launch_quantize_rows(x, q, scale, stride, mode, group, partials, pair_slots)
        return q.view(torch.uint8), scale

    q_rows, s_rows = quantise(M, None)
    q_slots, s_slots = quantise(plan.capacity, plan.pair_slots)
    slots = plan.pair_slots.long()
    valid = slots >= 0
    tokens = torch.arange(M).repeat_interleave(k)[valid]
    assert torch.equal(q_slots[slots[valid]], q_rows[tokens]), "a pair's slot holds its row"
    written = torch.zeros(plan.capacity, dtype=torch.bool)
    written[slots[valid]] = True
    assert (q_slots[~written] == _POISON_BYTE).all(), "padding and unused slots untouched"
    if mode in ("token", "group"):
        assert torch.equal(s_slots[slots[valid]], s_rows[tokens]), "per-row scales travel"
        assert s_slots[~written].isnan().all()
    elif mode != "static":
        assert torch.equal(s_slots, s_rows), "one scale for the tensor"


def _chosen(w13, block_m=128, activation="silu", input_group_k=FULL, weight_group=(FULL, FULL),
            inter_group=128, has_bias=False):
    return use_gluon_gemm1(w13, block_m, activation, input_group_k, weight_group, inter_group,
                           has_bias)


def test_gluon_gemm1_shape_rules(monkeypatch):
    # The predicate's own rules, on the CPU: the device check (`gluon_allowed`: an sm_90
    # GPU, Gluon present, not switched off) answers yes here.
    monkeypatch.setattr(moekit._gluon_gemm1, "gluon_allowed", lambda t: True)
    w13 = torch.empty(4, 512, 256, dtype=torch.float8_e4m3fn)  # I = 256
    assert _chosen(w13)
    assert _chosen(w13, activation="swigluoai", inter_group=None), "static GEMM2 input"
    assert _chosen(w13, has_bias=True), "biases"
    assert _chosen(w13, input_group_k=128, weight_group=(128, 128)), "block scales"
    assert _chosen(w13, input_group_k=256, weight_group=(256, 256)), "2 K steps a group"
    assert _chosen(w13, weight_group=(FULL, 128)), "per-K, one scale per expert"
    assert not _chosen(w13, input_group_k=128, weight_group=(128, 128), has_bias=True), (
        "block scales with biases on whole blocks: measured slower at M = 16384")
    assert not _chosen(w13, weight_group=(128, 128), has_bias=True), (
        "only w13's scales along K, with biases: the epilogue spills")
    assert not _chosen(w13, input_group_k=128, weight_group=(128, FULL), has_bias=True), (
        "only hidden's scales along K, with biases")
    assert not _chosen(w13, input_group_k=64), "an input group smaller than a K step"
    assert not _chosen(w13, weight_group=(128, 64)), "a weight group smaller than a K step"
    assert not _chosen(w13, weight_group=(64, 128)), "two weight scales per column tile"
    assert not _chosen(w13, weight_group=(512, 128)), "I not a multiple of the weight group"
    assert not _chosen(w13, block_m=64), "64-row tiles: the Triton kernel"
    assert not _chosen(w13, inter_group=64), "GEMM2 input groups ≠ the tile"
    partial = w13[:, :416].contiguous()  # I = 208, gpt-oss's 2880 in small
    assert _chosen(partial), "a partial last column tile"
    assert _chosen(partial, has_bias=True, activation="swigluoai"), "… with biases"
    assert _chosen(partial, input_group_k=128, weight_group=(128, 128)), (
        "128-row blocks spanning gate and up rows: two scales per up tile")
    assert _chosen(partial, input_group_k=128, weight_group=(128, 128), has_bias=True,
                   activation="swigluoai"), "… with biases (gpt-oss's form: they start the sums)"
    assert not _chosen(partial, weight_group=(128, 128), has_bias=True), (
        "… but only w13's scales along K")
    assert not _chosen(partial, weight_group=(256, 128)), (
        "256-row blocks not a multiple of I: the straddle moves from tile to tile")
    assert not _chosen(w13[:, :200].contiguous()), "I = 100: rows not 16-byte multiples"
    assert not _chosen(w13[:, :, :200].contiguous()), "H = 200: rows not 16-byte multiples"
    assert not _chosen(w13[:, :256]), "not contiguous (half of each expert's rows)"
    assert not _chosen(w13[:, :256].contiguous(), activation="relu2"), "ungated"
    assert not _chosen(w13.to(torch.bfloat16)), "16-bit"
    shifted = torch.empty(w13.numel() + 8, dtype=w13.dtype)[8:].view(w13.shape)
    assert not _chosen(shifted), "base not 16-byte aligned"


def test_up_tiles_straddling_two_weight_blocks():
    # (stride_e, stride_n, stride_k, GROUP_N, GROUP_K) of a [E, 2I / 128, H / 128] scale
    blocks = (64, 8, 1, 128, 128)
    assert split_up_scales(blocks, False, 2880) == 64, "gpt-oss: 22.5 blocks"
    assert split_up_scales(blocks, False, 208) == 48
    assert split_up_scales(blocks, True, 256) == 0, "I a multiple of the blocks"
    assert split_up_scales((64, 8, 0, 128, 1), False, 208) == 0, "constant along K"
    assert split_up_scales((64, 0, 1, 1, 128), False, 208) == 0, "one scale per expert"


def test_input_scales_travel_in_the_stage_only_when_asked(monkeypatch):
    monkeypatch.setattr(moekit._gluon_gemm1, "STAGED_SCALES_ENV", None)
    assert not stage_input_scales()
    monkeypatch.setattr(moekit._gluon_gemm1, "STAGED_SCALES_ENV", "0")
    assert not stage_input_scales()
    monkeypatch.setattr(moekit._gluon_gemm1, "STAGED_SCALES_ENV", "1")
    assert stage_input_scales()


def test_gpt_oss_form_gives_the_first_math_warpgroup_more_registers(monkeypatch):
    monkeypatch.setattr(moekit._gluon_gemm1, "REGISTERS_ENV", None)
    assert worker_registers(64, True) == (248, 216), "straddling up tiles with biases"
    assert worker_registers(64, False) == (232, 232), "straddling, no biases"
    assert worker_registers(0, True) == (232, 232), "whole blocks"
    monkeypatch.setattr(moekit._gluon_gemm1, "REGISTERS_ENV", "240,224")
    assert worker_registers(0, False) == (240, 224), "the control sets every form"


def test_the_gemm1_control_switches_the_gluon_gemm1_off(monkeypatch):
    monkeypatch.setattr(moekit._gluon_gemm1, "gluon_allowed", lambda t: True)
    w13 = torch.empty(4, 512, 256, dtype=torch.float8_e4m3fn)
    monkeypatch.setenv(GEMM1_ENV, "0")
    assert not _chosen(w13), "MOEKIT_GLUON_GEMM1=0: Triton's GEMM1"
    monkeypatch.setenv(GEMM1_ENV, "yes")
    with pytest.raises(ValueError, match="MOEKIT_GLUON_GEMM1"):
        _chosen(w13)


def test_gluon_gemm1_needs_an_sm90_gpu(monkeypatch):
    w13 = torch.empty(4, 512, 256, dtype=torch.float8_e4m3fn)
    assert not _chosen(w13), "a CPU tensor"
    if not torch.cuda.is_available():
        return
    w13 = w13.cuda()
    assert _chosen(w13) == (torch.cuda.get_device_capability() == (9, 0))
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert not _chosen(w13), "switched off"


def test_row_tiles_are_grouped_where_an_experts_w13_outgrows_l2():
    def w13(experts, inter, hidden, dtype=torch.float8_e4m3fn):
        return torch.empty(experts, 2 * inter, hidden, dtype=dtype, device="meta")

    assert group_m(w13(8, 14336, 4096)) == GROUP_M > 1, "mixtral: 117 MB per expert"
    assert group_m(w13(256, 2048, 7168)) == 1, "deepseek-v3: 29 MB"
    assert group_m(w13(128, 768, 2048)) == 1, "qwen3-30b-a3b: 3 MB"
    assert HOPPER_L2_BYTES == 50 * 2**20, "off the GPU: an H100's L2"
    assert group_m(w13(1, 1024, 1024), l2=2 * 2**20 - 1) == GROUP_M, "just over"
    assert group_m(w13(1, 1024, 1024), l2=2 * 2**20) == 1, "exactly L2: fits"
    assert group_m(w13(1, 512, 1024, torch.bfloat16), l2=2 * 2**20) == 1, "bytes, not values"


# ---------------------------------------------------------------------------- GPU

GPU_SCHEMES = [
    "fp8_tensor", "fp8_channel", QuantScheme.fp8_tensor(dynamic=False),
    "fp8_block",  # per-K scales of both operands
    QuantScheme(QuantSpec(group="channel"), QuantSpec(group=(1, 128))),  # hidden's only
    QuantScheme(QuantSpec(group=(128, 128)), QuantSpec(group="token")),  # w13's only
]


@pytest.fixture
def gemm1_calls(monkeypatch):
    """Counts the layer's calls of the Gluon GEMM1, so a test knows it ran."""
    return count_calls(monkeypatch, moekit.experts_fp8, "gluon_gemm1")


def _require_gluon():
    w13 = torch.empty(1, 256, 128, dtype=torch.float8_e4m3fn, device="cuda")
    if not use_gluon_gemm1(w13, 128, "silu", FULL, (FULL, FULL), 128, False):
        pytest.skip("the Gluon GEMM1 needs an sm_90 GPU and Triton's Gluon")


@pytest.mark.gpu
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("scheme", GPU_SCHEMES)
@pytest.mark.parametrize("M,E,k,H,I,act,bias,skew", [
    (2048, 8, 2, 1024, 512, "silu", False, 0.0),  # 512 rows per expert: whole tiles
    (1000, 16, 4, 768, 384, "swigluoai", True, 3.0),  # skewed: odd 64-row tails; biases
    (300, 32, 8, 528, 256, "gelu", False, 0.0),  # H a partial K step (TMA zero-fills)
    # I and H not multiples of 128 (gpt-oss's 2880): partial last column tiles, K steps
    (1000, 16, 4, 336, 208, "swigluoai", True, 3.0),
    (600, 8, 2, 336, 208, "silu", False, 0.0),
    # I = 64 mod 128 (gpt-oss's form): every up tile straddles two 128-row blocks, and the
    # last tile's second half is all past I (its block clamped to the expert's last)
    (1000, 16, 4, 320, 192, "swigluoai", True, 3.0),
])
def test_fp8_prefill_with_the_gluon_gemm1_gpu(scheme, tail, M, E, k, H, I, act, bias, skew,
                                             gemm1_calls, monkeypatch):
    _require_gluon()
    scheme, hidden, q13, q2, ids, weights, b13, b2 = make_case(
        scheme, M, E, k, H, I, act, bias=bias, dtype=torch.bfloat16, device="cuda", skew=skew)
    config = plan_fp8_config(4096, E, k, scheme)  # 128-row tiles at any M
    config = dataclasses.replace(config, tail_block_m=64 if tail else 0)
    ids[::7, -1] = -1  # dropped pairs
    outs = {}
    for name, env in (("gluon", "1"), ("triton", "0")):
        monkeypatch.setenv(DISABLE_ENV, env)
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme, activation=act,
                                 b13=b13, b2=b2, config=config, out=out)
        outs[name] = out
    # 128-row weight blocks straddling the up tiles run in Gluon; biases with scales along
    # K only in gpt-oss's form (`takes_biases`), else Triton's GEMM1.
    k_groups = [g for g in (scheme.activation.group[1], scheme.weight.group[1]) if g != FULL]
    declined = bias and not takes_biases(k_groups, scheme.weight.group[0], I)
    assert len(gemm1_calls) == (0 if declined else 1), "Gluon GEMM1 runs, control not"
    expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme,
                                       activation=act, b13=b13, b2=b2)
    assert_close(outs["gluon"], expected, GPU_TOL, name=f"{scheme} tail={tail}")
    assert_close(outs["gluon"], outs["triton"], TRITON_AGREEMENT, name="against Triton's")


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,dtype,H", [
    ("fp8_tensor", torch.bfloat16, 1024),  # GEMM2 256 columns wide: a half per warpgroup
    ("fp8_block", torch.bfloat16, 1024),  # per-K scales; GEMM2's tails 64 columns each
    ("fp8_channel", torch.float32, 640),  # fp32 out, H = 5 × 128: GEMM2 128 columns wide
    (QuantScheme.fp8_tensor(dynamic=False), torch.bfloat16, 768),  # static input scales
])
def test_many_tiles_per_program_with_tails_gpu(scheme, dtype, H, gemm1_calls, monkeypatch):
    # Three programs run every tile, tails back to back among them (GEMM1's idle in one
    # math warpgroup, GEMM2's split by columns across both): the stage ring's phases wrap
    # many times, and which program runs a tile changes no value.
    _require_gluon()
    M, E, k, I = 1000, 32, 4, 384
    scheme, hidden, q13, q2, ids, weights, b13, b2 = make_case(
        scheme, M, E, k, H, I, dtype=dtype, device="cuda", skew=3.0)
    config = dataclasses.replace(plan_fp8_config(4096, E, k, scheme), tail_block_m=64)
    gemm2_calls = count_calls(monkeypatch, moekit.experts_fp8, "gluon_gemm2")
    outs = {}
    for programs in (None, 3):
        if programs:
            monkeypatch.setattr(moekit.experts_fp8, "persistent_programs",
                                lambda device, programs=programs: programs)
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme, config=config,
                                 out=out)
        outs[programs] = out
    assert len(gemm1_calls) == 2 and len(gemm2_calls) == 2, "both Gluon GEMMs ran"
    assert torch.equal(outs[3], outs[None]), "the program running a tile moved a value"
    expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme)
    assert_close(outs[3], expected, GPU_TOL, name=f"{scheme} {dtype} three programs")


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["fp8_tensor", "fp8_block"])
@pytest.mark.parametrize("group", [3, 8])
def test_grouped_tile_order_changes_no_value_gpu(scheme, group, gemm1_calls, monkeypatch):
    # 2048 pairs over 4 experts, skewed: runs of several row tiles, odd 64-row tails, groups
    # that cross experts and a partial last group; 4 column tiles (I = 512).
    _require_gluon()
    M, E, k, H, I = 1024, 4, 2, 512, 512
    scheme, hidden, q13, q2, ids, weights, b13, b2 = make_case(
        scheme, M, E, k, H, I, dtype=torch.bfloat16, device="cuda", skew=2.0)
    config = plan_fp8_config(4096, E, k, scheme)
    outs = {}
    for order, rows in (("row major", 1), ("grouped", group)):
        monkeypatch.setattr(moekit._gluon_gemm1, "group_m", lambda w13, l2=None, rows=rows: rows)
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme, config=config,
                                 out=out)
        outs[order] = out
    assert len(gemm1_calls) == 2
    assert torch.equal(outs["grouped"], outs["row major"]), "the order moved a value"
    expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme)
    assert_close(outs["grouped"], expected, GPU_TOL, name=f"{scheme} group {group}")


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [
    "fp8_tensor", "fp8_channel", QuantScheme.fp8_tensor(dynamic=False),
    QuantScheme(QuantSpec(group=(128, 128)), QuantSpec(group="token")),  # w13's per K
])
@pytest.mark.parametrize("M,E,k,H,I,act,bias,skew", [
    (1000, 16, 4, 768, 384, "swigluoai", True, 3.0),  # odd 64-row tails, biases
    (300, 32, 8, 528, 256, "gelu", False, 0.0),  # H a partial K step: masked copies
])
def test_gathered_rows_equal_plan_order_rows_gpu(scheme, M, E, k, H, I, act, bias, skew,
                                                 monkeypatch):
    # Gathered: the producer copies each slot's token row itself (cp.async) instead of the
    # quantiser writing it to every plan slot; the same values reach the same MMAs.
    _require_gluon()
    if isinstance(scheme, QuantScheme) and scheme.weight.group[1] != FULL and bias:
        pytest.skip("per-K weight scales with biases keep the Triton GEMM1")
    scheme, hidden, q13, q2, ids, weights, b13, b2 = make_case(
        scheme, M, E, k, H, I, act, bias=bias, dtype=torch.bfloat16, device="cuda", skew=skew)
    config = plan_fp8_config(4096, E, k, scheme)
    ids[::7, -1] = -1  # dropped pairs
    gathered = []
    real = moekit.experts_fp8.gluon_gemm1
    monkeypatch.setattr(moekit.experts_fp8, "gluon_gemm1", lambda *args, **kwargs: (
        gathered.append(kwargs.get("gather_top_k")), real(*args, **kwargs))[1])
    outs = {}
    for gather in (False, True):
        monkeypatch.setattr(moekit._gluon_gemm1, "GATHER_MIN_TOP_K", 1 if gather else 10**9)
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme, activation=act,
                                 b13=b13, b2=b2, config=config, out=out)
        outs[gather] = out
    assert gathered == [None, k], "the second call gathers"
    assert torch.equal(outs[True], outs[False]), "gathered rows changed a value"
    expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme,
                                       activation=act, b13=b13, b2=b2)
    assert_close(outs[True], expected, GPU_TOL, name=f"{scheme} gathered")


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [
    "fp8_block",  # both operands' scales along K
    QuantScheme(QuantSpec(group="channel"), QuantSpec(group=(1, 128))),  # hidden's only
])
@pytest.mark.parametrize("M,E,k,H,I,act,bias,skew", [
    (1000, 16, 4, 768, 384, "silu", False, 3.0),  # whole blocks, odd 64-row tails
    (300, 32, 8, 528, 256, "gelu", False, 0.0),  # H a partial K step: a partial group
    (1000, 16, 4, 320, 192, "swigluoai", True, 3.0),  # gpt-oss's form (forced here)
    (600, 8, 2, 336, 208, "silu", False, 0.0),  # straddling without biases
])
def test_staged_input_scales_equal_scales_by_pointer_gpu(scheme, M, E, k, H, I, act, bias,
                                                         skew, monkeypatch):
    # Through the stage: the quantiser writes hidden's per-K scales transposed and the
    # producer loads each step's by TMA; the same scales meet the same products.
    _require_gluon()
    scheme, hidden, q13, q2, ids, weights, b13, b2 = make_case(
        scheme, M, E, k, H, I, act, bias=bias, dtype=torch.bfloat16, device="cuda", skew=skew)
    k_groups = [g for g in (scheme.activation.group[1], scheme.weight.group[1]) if g != FULL]
    if bias and not takes_biases(k_groups, scheme.weight.group[0], I):
        pytest.skip("biases with these scales keep the Triton GEMM1")
    config = dataclasses.replace(plan_fp8_config(4096, E, k, scheme), tail_block_m=64)
    ids[::7, -1] = -1  # dropped pairs
    staged = []
    real = moekit.experts_fp8.gluon_gemm1
    monkeypatch.setattr(moekit.experts_fp8, "gluon_gemm1", lambda *args, **kwargs: (
        staged.append(kwargs.get("x_staged")), real(*args, **kwargs))[1])
    outs = {}
    for control in ("0", "1"):
        monkeypatch.setattr(moekit._gluon_gemm1, "STAGED_SCALES_ENV", control)
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme, activation=act,
                                 b13=b13, b2=b2, config=config, out=out)
        outs[control] = out
    assert staged == [False, True], "the second call stages the scales"
    assert torch.equal(outs["1"], outs["0"]), "staged scales changed a value"
    expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme,
                                       activation=act, b13=b13, b2=b2)
    assert_close(outs["1"], expected, GPU_TOL, name=f"{scheme} staged")


@pytest.mark.gpu
def test_cuda_graph_replay_with_the_gluon_gemm1_gpu(gemm1_calls):
    # New routing on every replay: the plan-order copy follows the new pair slots.
    _require_gluon()
    E, k, H, I, M = 16, 4, 512, 256, 1024
    scheme, hidden, q13, q2, ids, weights, b13, b2 = make_case(
        "fp8_channel", M, E, k, H, I, bias=True, dtype=torch.bfloat16, device="cuda")
    config = plan_fp8_config(4096, E, k, scheme)
    call = lambda: moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme,
                                            b13=b13, b2=b2, config=config)
    graph, out = capture_cuda_graph(call)
    assert gemm1_calls, "the Gluon GEMM1 was captured"
    for seed in (1, 2):
        new_ids, new_weights = random_routing(M, E, k, device="cuda", seed=seed, skew=4.0 * seed)
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        hidden.copy_(seeded_randn_like(hidden, seed))
        out.fill_(float("nan"))
        graph.replay()
        expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme,
                                           b13=b13, b2=b2)
        assert_close(out, expected, GPU_TOL, name=f"replay {seed}")
