"""The 16-bit Gluon GEMM2 (`moekit._gluon_gemm2_16bit`): when it is chosen, and on an sm_90
GPU the bf16/fp16 layer with it against the reference and against the Triton GEMM2 (the
same GEMM1 before both).

The kernel itself only runs on Hopper (Gluon has no interpreter for wgmma/TMA); its
sm_90 compile (no spills, shared memory) is in tests/test_sm90_compile.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit
import moekit._gluon
import moekit._gluon_gemm2_16bit
import moekit.experts
from helpers import (
    assert_close,
    check_graph_replay_with_new_routing,
    check_reruns_bitwise,
    count_calls,
    cuda_layer_case,
    float32_reference,
    outputs_both_ways,
    poison_,
    poison_cuda_cache,
)
from moekit._gluon import DISABLE_ENV, GEMM2_ENV, GEMM2_GROUP_M, GEMM2_GROUP_M_ENV
from moekit._gluon_gemm2_16bit import use_gluon_gemm2_16bit
from moekit.tuning.heuristic import tiles_for_block_m

# Both GEMM2s sum the same products in K order in fp32 and round each row to 16 bits once;
# a plumbing bug (row, expert, column tile, slot) costs far more than this.
TRITON_AGREEMENT = 2e-3


def test_shape_rules(monkeypatch):
    # The predicate's own rules, on the CPU: the device check (`gluon_allowed`: an sm_90
    # GPU, Gluon present, not switched off) answers yes here.
    monkeypatch.setattr(moekit._gluon_gemm2_16bit, "gluon_allowed", lambda t: True)
    w2 = torch.empty(4, 512, 256, dtype=torch.bfloat16)  # H = 512, I = 256

    def chosen(w=w2, block_m=128):
        return use_gluon_gemm2_16bit(w, block_m, num_pairs=1000)

    assert chosen()
    assert chosen(w=w2.half()), "fp16"
    assert chosen(w=w2[..., :200].contiguous()), "I = 200: a partial last K step"
    assert not chosen(block_m=64), "64-row tiles: the Triton kernel"
    assert not chosen(w=w2[:, :384].contiguous()), "H = 384: whole 256-column tiles only"
    assert not chosen(w=w2[..., :100].contiguous()), "I = 100: rows not 16-byte multiples"
    assert not chosen(w=w2.float()), "fp32"
    assert not chosen(w=w2.to(torch.float8_e4m3fn)), "fp8 has its own kernel"
    assert not chosen(w=w2.transpose(1, 2)), "not contiguous"
    shifted = torch.empty(w2.numel() + 1, dtype=w2.dtype)[1:]
    assert not chosen(w=shifted.view(w2.shape)), "base not 16-byte aligned"


def test_chosen_only_on_an_sm90_gpu(monkeypatch):
    w2 = torch.empty(4, 512, 256, dtype=torch.bfloat16)
    assert not use_gluon_gemm2_16bit(w2, 128, 1000), "CPU tensors"
    if not torch.cuda.is_available():
        return
    w2 = w2.cuda()
    assert use_gluon_gemm2_16bit(w2, 128, 1000) == (torch.cuda.get_device_capability() == (9, 0))
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert not use_gluon_gemm2_16bit(w2, 128, 1000), "switched off"


# ---------------------------------------------------------------------------- GPU


@pytest.fixture
def gemm2_calls(monkeypatch):
    """Counts the layer's calls of the Gluon GEMM2, so a test knows it ran."""
    return count_calls(monkeypatch, moekit.experts, "gluon_gemm2_16bit")


def _require_gluon():
    if not use_gluon_gemm2_16bit(torch.empty(1, 256, 128, dtype=torch.bfloat16,
                                             device="cuda"), 128, num_pairs=1000):
        pytest.skip("the Gluon GEMM2 needs an sm_90 GPU and Triton's Gluon")


@pytest.mark.gpu
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("M,E,k,H,I,dtype,act,bias,on_input,skew", [
    (2048, 8, 2, 1024, 512, torch.bfloat16, "silu", False, False, 0.0),  # whole tiles
    (1000, 16, 4, 768, 384, torch.bfloat16, "swigluoai", True, False, 3.0),  # odd tails
    (300, 32, 8, 512, 200, torch.float16, "gelu", False, True, 0.0),  # partial K step
    (700, 16, 6, 1280, 1408, torch.bfloat16, "gelu_tanh", True, True, 1.0),  # 5 col tiles
])
def test_layer_with_the_gluon_gemm2_gpu(tail, M, E, k, H, I, dtype, act, bias, on_input, skew,
                                        gemm2_calls, monkeypatch):
    _require_gluon()
    hidden, w13, w2, b13, b2, ids, weights = cuda_layer_case(M, E, k, H, I, dtype, bias, skew)
    config = dataclasses.replace(tiles_for_block_m(128), tail_block_m=64 if tail else 0)
    real_choice = moekit.experts.use_gluon_gemm2_16bit
    outs = {}
    for name, choose in (("gluon", real_choice), ("triton", lambda *args: False)):
        monkeypatch.setattr(moekit.experts, "use_gluon_gemm2_16bit", choose)
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        moekit.fused_experts(hidden, w13, w2, ids, weights, activation=act, b13=b13, b2=b2,
                             apply_router_weight_on_input=on_input, config=config, out=out)
        outs[name] = out
    assert len(gemm2_calls) == 1, "the Gluon GEMM2 ran once, the control not"
    expected = float32_reference(hidden, w13, w2, b13, b2, ids, weights, act, on_input)
    assert_close(outs["gluon"], expected, name=f"{dtype} tail={tail}")
    assert_close(outs["gluon"], outs["triton"], TRITON_AGREEMENT, name="against Triton's")


@pytest.mark.gpu
@pytest.mark.parametrize("M,gluon_runs", [(512, False), (2048, True)])
def test_layer_takes_tritons_gemm2_at_few_row_tiles_of_large_experts_gpu(
        M, gluon_runs, gemm2_calls, monkeypatch):
    # With L2 taken as 1 MB, each expert's w2 (1024 × 512 bf16: 1 MB) outgrows half of it;
    # 8 experts, top 2: M = 512 averages 128 rows an expert (Triton's GEMM2), 2048 averages
    # 512 (the Gluon one). Either way the layer matches the reference.
    _require_gluon()
    monkeypatch.delenv(GEMM2_ENV, raising=False)
    monkeypatch.setattr(moekit._gluon, "l2_bytes_of", lambda t: 2**20)
    hidden, w13, w2, b13, b2, ids, weights = cuda_layer_case(M, 8, 2, 1024, 512,
                                                             torch.bfloat16, False, 0.0)
    config = dataclasses.replace(tiles_for_block_m(128), tail_block_m=64)
    out = poison_(torch.empty_like(hidden))
    moekit.fused_experts(hidden, w13, w2, ids, weights, config=config, out=out)
    assert len(gemm2_calls) == int(gluon_runs)
    expected = float32_reference(hidden, w13, w2, None, None, ids, weights, "silu", False)
    assert_close(out, expected, name=f"M={M}")


@pytest.mark.gpu
def test_gluon_gemm2_replays_in_a_cuda_graph_with_new_routing_gpu(gemm2_calls):
    _require_gluon()
    check_graph_replay_with_new_routing(1024, 32, 8, 1024, 512, tiles_for_block_m(128))
    assert gemm2_calls, "captured through the Gluon GEMM2"


@pytest.mark.gpu
def test_gluon_gemm2_is_deterministic_gpu(gemm2_calls):
    _require_gluon()
    check_reruns_bitwise(4096, 64, 8, 2048, 768, tiles_for_block_m(128))
    assert gemm2_calls, "through the Gluon GEMM2"


@pytest.mark.gpu
@pytest.mark.parametrize("group,tail", [(3, True), (8, False), (8, True)])
def test_grouped_tile_order_changes_no_value_gpu(group, tail, gemm2_calls, monkeypatch):
    # Skewed routing over 4 experts: runs of several row tiles, odd 64-row tails, groups
    # that cross experts and a partial last group; 5 column tiles of 256 (H = 1280).
    _require_gluon()
    M, E, k, H, I = 1024, 4, 2, 1280, 512
    hidden, w13, w2, b13, b2, ids, weights = cuda_layer_case(M, E, k, H, I, torch.bfloat16,
                                                             True, 2.0)
    config = dataclasses.replace(tiles_for_block_m(128), tail_block_m=64 if tail else 0)
    outs = {}
    for order, rows in (("row major", 1), ("grouped", group)):
        monkeypatch.setenv(GEMM2_GROUP_M_ENV, str(rows))
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        moekit.fused_experts(hidden, w13, w2, ids, weights, b13=b13, b2=b2, config=config,
                             out=out)
        outs[order] = out
    assert len(gemm2_calls) == 2, "the Gluon GEMM2 ran in both orders"
    assert torch.equal(outs["grouped"], outs["row major"]), "the order moved a value"
    expected = float32_reference(hidden, w13, w2, b13, b2, ids, weights, "silu", False)
    assert_close(outs["grouped"], expected, name=f"group {group} tail={tail}")


def test_row_tiles_are_grouped_where_an_experts_w2_outgrows_half_of_l2(monkeypatch):
    monkeypatch.delenv(GEMM2_GROUP_M_ENV, raising=False)
    group_m = moekit._gluon.gemm2_group_m
    w2 = lambda hidden, inter, dtype=torch.bfloat16: torch.empty(  # noqa: E731
        (1, hidden, inter), dtype=dtype, device="meta")
    assert group_m(w2(7168, 2048)) == GEMM2_GROUP_M > 1, "deepseek-v3: 29 MB an expert"
    assert group_m(w2(4096, 14336)) == GEMM2_GROUP_M, "mixtral: 117 MB"
    assert group_m(w2(2048, 768)) == 1, "qwen3: 3 MB, row tile major"
    assert group_m(w2(2048, 1024), l2=8 * 2**20 - 2) == GEMM2_GROUP_M, "4 MB: just over half"
    assert group_m(w2(2048, 1024), l2=8 * 2**20) == 1, "exactly half stays row major"
    assert group_m(w2(7168, 2048), by_size=False) == 1, "the fp8 GEMM2: row tile major"
    monkeypatch.setenv(GEMM2_GROUP_M_ENV, "3")
    assert group_m(w2(2048, 768)) == 3 and group_m(w2(7168, 2048), by_size=False) == 3


def test_gemm2_controls_read_at_each_launch(monkeypatch):
    monkeypatch.delenv(GEMM2_ENV, raising=False)
    w2 = torch.empty(2, 256, 128, dtype=torch.bfloat16)
    monkeypatch.setattr(moekit._gluon_gemm2_16bit, "gluon_allowed", lambda t: True)
    assert use_gluon_gemm2_16bit(w2, 128, 1000)
    monkeypatch.setenv(GEMM2_ENV, "0")
    assert not use_gluon_gemm2_16bit(w2, 128, 1000), "Triton's GEMM2 when told"
    monkeypatch.setenv(GEMM2_ENV, "1")
    assert use_gluon_gemm2_16bit(w2, 128, 1000)
    monkeypatch.setenv(GEMM2_ENV, "yes")
    with pytest.raises(ValueError, match="MOEKIT_GLUON_GEMM2='yes'"):
        use_gluon_gemm2_16bit(w2, 128, 1000)


def test_triton_gemm2_at_few_row_tiles_of_experts_outgrowing_half_of_l2(monkeypatch):
    # Shapes only (meta tensors, an H100's L2 of 50 MB): deepseek-v3 (256 experts, top 8,
    # w2 29 MB an expert) and mixtral (8, top 2, 117 MB) average ≤ 2 row tiles an expert up
    # to M = 8192 and 1024; qwen3's w2 (3 MB) fits, so its GEMM2 stays Gluon at any M.
    monkeypatch.delenv(GEMM2_ENV, raising=False)
    monkeypatch.setattr(moekit._gluon_gemm2_16bit, "gluon_allowed", lambda t: True)
    w2 = lambda experts, hidden, inter: torch.empty(  # noqa: E731
        (experts, hidden, inter), dtype=torch.bfloat16, device="meta")
    deepseek, mixtral, qwen3 = w2(256, 7168, 2048), w2(8, 4096, 14336), w2(128, 2048, 768)

    def gluon(w, tokens, top_k):
        return use_gluon_gemm2_16bit(w, 128, tokens * top_k)

    assert not gluon(deepseek, 4096, 8), "128 rows an expert"
    assert not gluon(deepseek, 8192, 8), "256 rows an expert: two row tiles"
    assert gluon(deepseek, 8193, 8) and gluon(deepseek, 16384, 8)
    assert not gluon(mixtral, 1024, 2) and gluon(mixtral, 1025, 2)
    assert gluon(qwen3, 1024, 8) and gluon(qwen3, 4096, 8)
    monkeypatch.setenv(GEMM2_ENV, "1")
    assert gluon(deepseek, 4096, 8), "MOEKIT_GLUON_GEMM2=1: the Gluon GEMM2 past the rule"


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch,tail", [(True, True), (False, True), (True, False)])
def test_expert_groups_change_no_value_gpu(prefetch, tail, gemm2_calls, monkeypatch):
    # GROUP_M's order in groups that never span two experts (`EXPERT_GROUPS`; groups of 3,
    # so runs of several row tiles split): the same bits, the tile's indices loaded at its
    # start or a tile ahead (`prefetch_entry` then computes the order too), with and
    # without tail tiles (without them `expert_offsets` is also the work pointer).
    _require_gluon()
    monkeypatch.setenv(moekit._gluon.GEMM2_GROUP_M_ENV, "3")
    monkeypatch.setattr(moekit._gluon, "PREFETCH_TILES", prefetch)
    _check_switch_changes_no_value("EXPERT_GROUPS", 64 if tail else 0, gemm2_calls,
                                   monkeypatch, "the expert groups",
                                   f"expert groups prefetch={prefetch} tail={tail}")


def _check_switch_changes_no_value(switch, tail_m, gemm2_calls, monkeypatch, what, name):
    """The layer with `moekit._gluon.<switch>` on and off, on skewed routing over 4 experts
    with odd 64-row tails and 5 column tiles: the Gluon GEMM2 ran both ways, the outputs
    are the same bits, and they match the reference."""
    M, E, k, H, I = 1000, 4, 2, 1280, 704
    hidden, w13, w2, b13, b2, ids, weights = cuda_layer_case(M, E, k, H, I, torch.bfloat16,
                                                             True, 2.0)
    config = dataclasses.replace(tiles_for_block_m(128), tail_block_m=tail_m)
    outs = outputs_both_ways(monkeypatch, moekit._gluon, switch, lambda: (
        moekit.fused_experts(hidden, w13, w2, ids, weights, b13=b13, b2=b2, config=config,
                             out=poison_(torch.empty_like(hidden)))))
    assert len(gemm2_calls) == 2, "the Gluon GEMM2 ran both ways"
    assert torch.equal(outs[True], outs[False]), f"{what} moved a value"
    expected = float32_reference(hidden, w13, w2, b13, b2, ids, weights, "silu", False)
    assert_close(outs[True], expected, name=name)
