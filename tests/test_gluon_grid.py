"""The Gluon GEMMs' grid (`moekit._gluon.schedule`): persistent, one program per SM, or
one program per tile the plan could hold (or a few consecutive tiles each), where
persistent programs drifting apart would read shared weight tiles from DRAM again
(`programs_drift_apart`; bench/NOTES.md, session 50).

The rule on the presets' shapes and the control's settings run on the CPU; on an sm_90
GPU every grid must give bitwise the same layer (each tile is computed the same way
whichever program takes it), close to the reference, with programs past the tiles in use.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import moekit
import moekit.experts
import moekit.experts_fp8
from helpers import assert_close, count_calls, cuda_layer_case, float32_reference, poison_
from moekit import _gluon
from moekit._gluon import TILE_PROGRAMS_ENV, programs_drift_apart, schedule
from moekit.reference import fused_experts_quantized
from moekit.tuning.heuristic import tiles_for_block_m
from test_experts_fp8 import GPU_TOL
from test_gluon_prefetch import _require_gluon, fp8_tail_tile_case

H100_SMS, H100_L2 = 132, 50 * 2**20


def _gemm1_fp8_drifts(tokens, experts, top_k, hidden, inter, l2=H100_L2):
    """The rule for the fp8 GEMM1: a column tile is 2 × 128 rows (gate, up) of H bytes, in
    flight against GEMM1_WEIGHT_SHARE_OF_L2 of L2 (as `schedule` passes for GEMM 1)."""
    return programs_drift_apart(H100_SMS, 2 * 128 * hidden, tokens * top_k, experts, l2,
                                2 * inter * hidden,
                                weight_share=_gluon.GEMM1_WEIGHT_SHARE_OF_L2)


def test_one_program_per_tile_where_shared_weight_tiles_outgrow_l2():
    # deepseek-v3 (256 experts, top 8, H = 7168, I = 2048): from one row tile an expert
    # (M = 4096) 132 programs hold 242 MB of w13 tiles over the row tiles an expert averages.
    assert _gemm1_fp8_drifts(4096, 256, 8, 7168, 2048), "one row tile an expert: 242 MB"
    assert _gemm1_fp8_drifts(16384, 256, 8, 7168, 2048), "four row tiles: 60 MB"
    assert not _gemm1_fp8_drifts(4095, 256, 8, 7168, 2048), "under a row tile an expert"
    # gpt-oss (128 experts, top 4, H = I = 2880): 97 MB at one row tile, 49 MB at two (0.93
    # of L2: past the GEMM1's share), 24 MB at four
    assert _gemm1_fp8_drifts(4096, 128, 4, 2880, 2880)
    assert _gemm1_fp8_drifts(8192, 128, 4, 2880, 2880), "49 MB: 0.93 of L2"
    assert not _gemm1_fp8_drifts(16384, 128, 4, 2880, 2880), "24 MB fit L2"
    # its GEMM2 (128-column tiles of I = 2880 bytes) keeps all of L2: 49 MB at one row tile
    assert not programs_drift_apart(H100_SMS, 128 * 2880, 4096 * 4, 128, H100_L2, 2880 * 2880)
    # the fp8 GEMM2 of deepseek-v3: 256-column tiles of I = 2048 bytes, 69 MB at one row tile
    assert programs_drift_apart(H100_SMS, 256 * 2048, 4096 * 8, 256, H100_L2, 7168 * 2048)
    assert not programs_drift_apart(H100_SMS, 256 * 2048, 8192 * 8, 256, H100_L2, 7168 * 2048)


def test_small_experts_stay_persistent():
    # qwen3 (128 experts, top 8, H = 2048, I = 768): at M = 2048 its 132 programs hold 69 MB
    # of w13 tiles, past L2, but one expert's w13 is 3 MB (measured 0.98× one per tile).
    assert not _gemm1_fp8_drifts(2048, 128, 8, 2048, 768)
    share = H100_L2 // _gluon.SMALL_EXPERT_L2_SHARE  # 6.25 MiB
    assert not programs_drift_apart(H100_SMS, 2 * 128 * 2048, 2048 * 8, 128, H100_L2, share)
    assert programs_drift_apart(H100_SMS, 2 * 128 * 2048, 2048 * 8, 128, H100_L2, share + 1)
    assert not _gemm1_fp8_drifts(4096, 128, 8, 2048, 768, l2=33 * 2**20), "3 MB ≤ 33 MiB / 8"
    assert _gemm1_fp8_drifts(4096, 128, 8, 2048, 768, l2=24 * 2**20 - 8), "a smaller L2"


def _plan(row_tiles, num_pairs):
    return SimpleNamespace(num_pairs=num_pairs, row_tiles=lambda: (row_tiles, 128, 0))


def test_grid_follows_the_control_then_the_rule(monkeypatch):
    monkeypatch.delenv(TILE_PROGRAMS_ENV, raising=False)
    large = torch.empty(256, 4096, 7168, dtype=torch.float8_e4m3fn, device="meta")
    small = torch.empty(128, 1536, 2048, dtype=torch.float8_e4m3fn, device="meta")
    deepseek, qwen3 = _plan(512, 8192 * 8), _plan(300, 2048 * 8)
    # one tile a program: the persistent loop (CHUNK 0) over a grid of every tile
    assert schedule(132, deepseek, 16, large, 2 * 128 * 7168) == ((512 * 16,), 0)
    assert schedule(132, qwen3, 12, small, 2 * 128 * 2048) == ((132,), 0)
    assert schedule(132, deepseek, 16) == ((132,), 0), "no weights given (16-bit): persistent"
    monkeypatch.setenv(TILE_PROGRAMS_ENV, "0")
    assert schedule(132, deepseek, 16, large, 2 * 128 * 7168) == ((132,), 0)
    monkeypatch.setenv(TILE_PROGRAMS_ENV, "1")
    assert schedule(132, qwen3, 12, small, 2 * 128 * 2048) == ((300 * 12,), 0)
    assert schedule(132, deepseek, 16) == ((512 * 16,), 0)
    monkeypatch.setenv(TILE_PROGRAMS_ENV, "7")  # 3,600 tiles, 7 a program: the last has 2
    assert schedule(132, qwen3, 12) == ((515,), 7)
    monkeypatch.setenv(TILE_PROGRAMS_ENV, "r,2")  # GEMM1 the rule, GEMM2 2 tiles a program
    assert schedule(132, deepseek, 16, large, 2 * 128 * 7168) == ((512 * 16,), 0)
    assert schedule(132, qwen3, 12, small, 2 * 128 * 2048) == ((132,), 0)
    assert schedule(132, qwen3, 12, small, 2 * 128 * 2048, gemm=2) == ((1800,), 2)
    monkeypatch.setenv(TILE_PROGRAMS_ENV, "0,r")
    assert schedule(132, deepseek, 16, large, 2 * 128 * 7168) == ((132,), 0)
    assert schedule(132, deepseek, 16, large, 2 * 128 * 7168, gemm=2) == ((512 * 16,), 0)
    for value in ("yes", "-1", "2.5", "r", "1,2,3", "1,"):
        monkeypatch.setenv(TILE_PROGRAMS_ENV, value)
        with pytest.raises(ValueError, match=f"MOEKIT_GLUON_TILE_PROGRAMS='{value}'"):
            schedule(132, deepseek, 16)


def test_programs_taking_many_tiles_leave_persistent_grids(monkeypatch):
    monkeypatch.delenv(TILE_PROGRAMS_ENV, raising=False)
    w2 = torch.empty(256, 7168, 2048, dtype=torch.float8_e4m3fn, device="meta")
    tile = 256 * 2048  # deepseek-v3's fp8 GEMM2: 256 columns of I bytes, 28 column tiles
    # M = 8192: 35 MB of weight tiles in flight (under L2), but 764 row tiles × 28 column
    # tiles over 132 programs is 162 tiles a program: one tile a program
    assert not programs_drift_apart(132, tile, 8192 * 8, 256, H100_L2, 7168 * 2048)
    assert programs_drift_apart(132, tile, 8192 * 8, 256, H100_L2, 7168 * 2048,
                                tiles_a_program=_gluon.MANY_TILES_A_PROGRAM)
    for gemm in (1, 2):
        assert schedule(132, _plan(764, 8192 * 8), 28, w2, tile, gemm=gemm) == ((764 * 28,), 0)
    few = _gluon.MANY_TILES_A_PROGRAM * 132 // 28 - 1  # row tiles just under the bound
    assert schedule(132, _plan(few, 8192 * 8), 28, w2, tile, gemm=2) == ((132,), 0)
    # small experts (qwen3's 1.5 MB w2) and under a row tile an expert stay persistent
    small = torch.empty(128, 2048, 768, dtype=torch.float8_e4m3fn, device="meta")
    assert schedule(132, _plan(4000, 16384 * 8), 8, small, 256 * 768, gemm=2) == ((132,), 0)
    assert schedule(132, _plan(2000, 2048 * 8), 28, w2, tile, gemm=2) == ((132,), 0)


def _every_grid(monkeypatch, call):
    """`call()` persistent, one program per tile and 3 consecutive tiles a program:
    {setting: out}, after checking that the launches took those grids (one per SM; then
    other, larger ones)."""
    grids, chosen = [], _gluon.schedule
    monkeypatch.setattr(_gluon, "schedule",
                        lambda *args, **kwargs: grids.append(chosen(*args, **kwargs))
                        or grids[-1])
    outs, launched = {}, {}
    for setting in ("0", "1", "3"):
        monkeypatch.setenv(TILE_PROGRAMS_ENV, setting)
        grids.clear()
        outs[setting] = call()
        launched[setting] = list(grids)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert launched["0"] == [((sms,), 0)] * 2, "both GEMMs persistent"
    assert [chunk for _, chunk in launched["3"]] == [3, 3], launched
    assert all(grid[0] > sms and chunk == 0 for grid, chunk in launched["1"]), launched
    return outs


@pytest.mark.gpu
@pytest.mark.parametrize("tail", [True, False])
def test_16bit_grids_give_the_same_layer_gpu(tail, monkeypatch):
    _require_gluon()
    gemm1 = count_calls(monkeypatch, moekit.experts, "gluon_gemm1_16bit")
    gemm2 = count_calls(monkeypatch, moekit.experts, "gluon_gemm2_16bit")
    M, E, k, H, I = 1000, 16, 4, 768, 384
    hidden, w13, w2, b13, b2, ids, weights = cuda_layer_case(M, E, k, H, I, torch.bfloat16,
                                                             True, 3.0)
    config = dataclasses.replace(tiles_for_block_m(128), tail_block_m=64 if tail else 0)

    def call():
        out = poison_(torch.empty_like(hidden))
        return moekit.fused_experts(hidden, w13, w2, ids, weights, activation="silu",
                                    b13=b13, b2=b2, config=config, out=out)
    outs = _every_grid(monkeypatch, call)
    assert len(gemm1) == len(gemm2) == len(outs), "both Gluon GEMMs ran in every call"
    expected = float32_reference(hidden, w13, w2, b13, b2, ids, weights, "silu", False)
    assert_close(outs["3"], expected, name=f"tail={tail}, 3 tiles a program")
    assert torch.equal(outs["1"], outs["0"]) and torch.equal(outs["3"], outs["0"])


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["fp8_tensor", "fp8_block"])
def test_fp8_grids_give_the_same_layer_gpu(scheme, monkeypatch):
    _require_gluon()
    gemm1 = count_calls(monkeypatch, moekit.experts_fp8, "gluon_gemm1")
    gemm2 = count_calls(monkeypatch, moekit.experts_fp8, "gluon_gemm2")
    scheme, hidden, q13, q2, ids, weights, config = fp8_tail_tile_case(scheme)

    def call():
        out = poison_(torch.empty_like(hidden))
        return moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme,
                                        activation="silu", config=config, out=out)
    outs = _every_grid(monkeypatch, call)
    assert len(gemm1) == len(gemm2) == len(outs), "both Gluon GEMMs ran in every call"
    expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme,
                                       activation="silu")
    assert_close(outs["3"], expected, GPU_TOL, name=f"{scheme}, 3 tiles a program")
    assert torch.equal(outs["1"], outs["0"]) and torch.equal(outs["3"], outs["0"])


def test_the_rule_reads_this_gpus_l2(monkeypatch):
    # The grid asks the weights' device for its L2 (an H100's off the GPU), at each launch.
    monkeypatch.delenv(TILE_PROGRAMS_ENV, raising=False)
    seen = []
    monkeypatch.setattr(_gluon, "l2_bytes_of", lambda t: seen.append(t.shape) or 2**40)
    large = torch.empty(256, 4096, 7168, dtype=torch.float8_e4m3fn, device="meta")
    assert schedule(132, _plan(512, 8192 * 8), 16, large, 2 * 128 * 7168) == ((132,), 0)
    assert seen == [large.shape]
