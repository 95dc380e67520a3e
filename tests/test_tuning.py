"""Tile configuration: the heuristic, the search space, the tuner and tuned tables."""

import dataclasses
import json
import math

import pytest
import torch

from moekit.bench.presets import PRESETS
from moekit.tuning import ExpertsConfig, GemmConfig, default_config
from moekit.tuning.heuristic import (
    direct_slots_per_program,
    direct_tiles,
    narrow_layer,
    pick_block_m,
    tail_tiles_desync,
    tiles_for_block_m,
    use_direct_path,
)
from moekit.tuning.space import BLOCK_MS, candidates, gemm2_candidates, neighbour_block_ms
from moekit.tuning.tables import config_from_dict, config_to_dict, load_table, lookup
from moekit.tuning.tuner import cliffs, new_table, report, same_tiles_at, search, tune

BLOCK_M_CASES = [
    # (M, E, k, block_m, why)
    (1, 128, 8, 16, "decode: one row per expert"),
    (64, 8, 2, 32, "16 rows per expert on average; the busiest needs 32"),
    (512, 128, 8, 64, "32 rows on average"),
    (256, 40, 8, 64, "51 rows on average: the busiest needs 66, but 64 stays the cap"),
    (4096, 128, 8, 128, "prefill: compute-bound tiles"),
    (10, 1, 1, 32, "one expert takes every row"),
]


@pytest.mark.parametrize("M,E,k,block_m,why", BLOCK_M_CASES)
def test_block_m_holds_the_busiest_expert(M, E, k, block_m, why):
    assert pick_block_m(M, E, k) == block_m
    inter = 14336  # wide experts (mixtral's): few experts still make many column tiles
    if not use_direct_path(M, E, k) and not narrow_layer(E, inter):
        assert default_config(M, E, k, 4096, inter).block_m == block_m


DIRECT_CASES = [
    # (M, E, k, direct, why)
    (1, 128, 8, True, "one token: no pair shares an expert"),
    (1, 8, 2, True, "one token on few, large experts (mixtral) still"),
    (4, 128, 8, True, "4 tokens on 128 experts"),
    (5, 128, 8, False, "5 tokens: the plan path"),
    (2, 8, 2, False, "few experts: pairs share ones too large for L2"),
    (8, 128, 4, False, "8 tokens (gpt-oss: 32 pairs, measured slower)"),
]


@pytest.mark.parametrize("M,E,k,direct,why", DIRECT_CASES)
def test_direct_path_for_a_handful_of_tokens(M, E, k, direct, why):
    assert use_direct_path(M, E, k) == direct
    assert default_config(M, E, k, 2048, 768).direct == direct
    assert not use_direct_path(M, E, k, dtype_bytes=4)  # fp32: the plan path
    assert not default_config(M, E, k, 2048, 768, dtype_bytes=4).direct


FP8_DIRECT_CASES = [
    # (M, E, k, H, I, direct, why) — H200 measurements in use_direct_fp8_path's docstring
    (4, 128, 8, 2048, 768, True, "qwen3: 4 tokens × 2048 values"),
    (4, 64, 8, 2048, 1024, True, "olmoe: block scales win with two-group K tiles"),
    (1, 256, 8, 7168, 2048, True, "deepseek-v3, one token: 1.10× the plan path"),
    (2, 256, 8, 7168, 2048, False, "deepseek-v3, 2 tokens: the plan path 1.03–1.15×"),
    (4, 256, 8, 7168, 2048, False, "deepseek-v3, 4 tokens: plan (block 1.02×, others within 2%)"),
    (5, 128, 8, 2048, 768, False, "5 tokens: the plan path"),
    (1, 8, 2, 4096, 14336, False, "mixtral: 8 experts, the plan path (0.85–0.96×)"),
]


@pytest.mark.parametrize("M,E,k,H,I,direct,why", FP8_DIRECT_CASES)
def test_fp8_direct_path_up_to_8192_token_values(M, E, k, H, I, direct, why):
    from moekit.experts_fp8 import default_fp8_config

    for scheme in ("fp8_tensor", "fp8_channel", "fp8_block"):
        assert default_fp8_config(M, E, k, H, I, scheme).direct == direct, scheme


@pytest.mark.parametrize("M,k,H,dtype_bytes,per,why", [
    (1, 8, 2048, 2, 1, "32 column tiles: a program per slot (256 programs)"),
    (2, 8, 2048, 2, 2, "64 column tiles: four parts of two slots"),
    (8, 8, 2048, 2, 8, "256 column tiles: a program per token"),
    (4, 6, 2048, 2, 3, "128 column tiles: two parts of three slots"),
    (4, 8, 2048, 1, 2, "fp8: twice the programs, four parts"),
    (2, 2, 4096, 2, 1, "k = 2: at most two parts"),
    (1, 8, 0, 2, 1, "no H (the tuner's start at block_m 1): a program per slot"),
    (1, 8, 7168, 2, 3, "H = 7168: 224 programs a token at 32 wide, so one per token"),
])
def test_direct_gemm2_splits_slots_by_program_count(M, k, H, dtype_bytes, per, why):
    assert direct_slots_per_program(M, k, H, dtype_bytes) == per, why
    tiles = direct_tiles(M, k, H, dtype_bytes)
    if dtype_bytes == 2 and M * H // 32 >= 192:  # enough 32-wide programs: one per token
        assert (tiles.gemm2.block_n, tiles.gemm2.group_m) == (32, k), why
    else:
        assert (tiles.gemm2.block_n, tiles.gemm2.group_m) == (64, per), why


def test_every_row_tile_has_tiles_and_candidates():
    for block_m in BLOCK_MS:
        assert tiles_for_block_m(block_m).block_m == block_m
        assert candidates(block_m)
    # The constraint hook narrows the space (tests and users keep sweeps small with it).
    assert all(c.block_n <= 64 for c in candidates(128, lambda c: c.block_n <= 64))
    assert neighbour_block_ms(16) == [16, 1, 32] and neighbour_block_ms(128) == [128, 64]
    assert neighbour_block_ms(1) == [1, 16] and neighbour_block_ms(16, direct=False) == [16, 32]
    assert min(BLOCK_MS) == 1 and default_config(1, 128, 8, 2048, 768).block_m == 1


def test_wide_mid_tiles_only_on_aligned_rows():
    # qwen3 at M = 200 (32-row tiles) and 512 (64-row tiles): the wide tiles on 16-bit
    # rows of 8-element multiples (16 bytes: I = 264 too); ragged rows (I = 260) and fp32
    # keep the narrow ones, which do not spill or outgrow shared memory.
    for M, block_m in ((200, 32), (512, 64)):
        wide = default_config(M, 128, 8, 2048, 768)
        assert default_config(M, 128, 8, 2048, 264) == wide, "rows of 8k elements"
        narrow = default_config(M, 128, 8, 2048, 260)
        assert wide.block_m == narrow.block_m == block_m
        assert wide.gemm1.block_n > narrow.gemm1.block_n
        assert wide.gemm2.block_n > narrow.gemm2.block_n
        fp32 = default_config(M, 128, 8, 2048, 768, dtype_bytes=4)
        assert (fp32.gemm1.block_n, fp32.gemm2.block_n) == (narrow.gemm1.block_n,
                                                            narrow.gemm2.block_n)
    assert tiles_for_block_m(64, aligned=False) == tiles_for_block_m(64, dtype_bytes=4)


NARROW_LAYER_CASES = [
    # (M, block_m, narrow tiles, why) on granite: 40 experts, k = 8, H = 1536, I = 512
    (8, 16, True, "1.6 rows per expert on average"),
    (64, 16, True, "12.8 rows on average: 16 (the busiest-expert rule: 32)"),
    (128, 32, True, "25.6 rows: 32 (the busiest-expert rule: 64)"),
    (192, 64, False, "38.4 rows: the usual 64-row tiles measured faster"),
    (4096, 128, False, "prefill: the usual 128-row tiles"),
]


@pytest.mark.parametrize("M,block_m,narrow_tiles,why", NARROW_LAYER_CASES)
def test_narrow_layer_tiles(M, block_m, narrow_tiles, why):
    config = default_config(M, 40, 8, 1536, 512)
    assert config.block_m == block_m
    usual = tiles_for_block_m(block_m)
    if narrow_tiles:
        assert config.gemm1 == config.gemm2 == GemmConfig(128, 64, 8, 4, 3)
        assert config.gemm1 != usual.gemm1
    else:
        assert config == usual
    # Not narrow: more experts or wider ones (olmoe), a GPU of fewer SMs, fp32, ragged rows.
    assert default_config(M, 64, 8, 2048, 1024) == tiles_for_block_m(pick_block_m(M, 64, 8),
                                                                     wide_16=True)
    assert default_config(M, 40, 8, 1536, 512, num_sms=78).block_m == pick_block_m(M, 40, 8)
    assert default_config(M, 40, 8, 1536, 512, dtype_bytes=4) == tiles_for_block_m(
        pick_block_m(M, 40, 8), dtype_bytes=4)
    ragged = default_config(M, 40, 8, 1536, 516)
    assert ragged == tiles_for_block_m(pick_block_m(M, 40, 8), aligned=False)


WIDE_16_CASES = [
    # (M, E, k, H, I, wide, why) — H200 measurements in wide_16_row_tiles' docstring
    (8, 8, 2, 4096, 14336, True, "mixtral: GEMM2's 64-column programs made 1.7 rounds"),
    (16, 128, 8, 2048, 768, True, "qwen3: H and I 128-element multiples"),
    (8, 128, 4, 2880, 2880, False, "gpt-oss: a partial last column tile (0.95×)"),
    (8, 8, 2, 4096, 1792, True, "mixtral over 8 GPUs: narrow, but only 8 experts"),
    (16, 40, 8, 1536, 512, False, "granite: 40 narrow experts keep the narrow tiles"),
    (8, 64, 8, 2048, 1040, False, "I of 16- but not 128-element multiples: partial tiles"),
]


@pytest.mark.parametrize("M,E,k,H,I,wide,why", WIDE_16_CASES)
def test_wide_tiles_at_16_row_blocks(M, E, k, H, I, wide, why):
    config = default_config(M, E, k, H, I)
    assert config.block_m == 16, why
    assert (config.gemm1 == config.gemm2 == GemmConfig(128, 128, 8, 4, 3)) == wide, why
    # 16-bit only: fp32 keeps its 64-deep K tiles whatever the shape.
    assert default_config(M, E, k, H, I, dtype_bytes=4).gemm1.block_k == 64


def test_narrow_layer_counts_gemm1_programs_per_sm():
    # One row block per expert: granite 40 × 4 column tiles of 128 = 160 programs on 132
    # SMs; qwen3 128 × 6 = 768, olmoe 64 × 8 = 512.
    assert narrow_layer(40, 512) and not narrow_layer(40, 512, num_sms=80)
    assert not narrow_layer(128, 768) and not narrow_layer(64, 1024)
    narrow = [p.name for p in PRESETS.values() if narrow_layer(p.num_experts, p.inter)]
    assert narrow == ["granite-3.0-3b-a800m"]


def test_direct_gemm2_candidates_split_slots():
    # The direct GEMM2's candidates try each tile whole-token and split; the plan path's
    # are the shared ones.
    split = gemm2_candidates(1)
    assert {c.group_m for c in split} == {8, 2, 1}
    assert len(split) == 3 * len(candidates(1))
    assert gemm2_candidates(16) == candidates(16)
    assert all(c.group_m == 1 for c in gemm2_candidates(1, lambda c: c.group_m == 1))


def test_config_values_are_checked():
    with pytest.raises(ValueError, match="block_n"):
        GemmConfig(48, 64)
    with pytest.raises(ValueError, match="block_m"):
        ExpertsConfig(8, GemmConfig(64, 64), GemmConfig(64, 64))
    with pytest.raises(ValueError, match=r"^block_m: expected a power of two ≥ 16, or 1"):
        ExpertsConfig(2, GemmConfig(64, 64), GemmConfig(64, 64))


def fake_cost(config: ExpertsConfig) -> float:
    """A deterministic cost with a unique optimum: block_m 64, GEMM1 n=128, GEMM2 n=256."""
    cost = 100.0 + abs(config.block_m - 64) / 8
    cost += abs(config.gemm1.block_n - 128) / 64 + abs(config.gemm2.block_n - 256) / 64
    return cost + config.gemm1.num_stages * 0.01


def test_search_finds_a_better_configuration():
    heuristic = default_config(4096, 128, 8, 2048, 768)  # block_m 128
    best, best_us, heuristic_us = search(heuristic, fake_cost)
    assert best.block_m == 64 and best.gemm1.block_n == 128 and best.gemm2.block_n == 256
    assert best_us == fake_cost(best) < heuristic_us == fake_cost(heuristic)


def test_search_tries_tail_tiles_last():
    heuristic = default_config(4096, 128, 8, 2048, 768)  # block_m 128, tail tiles on
    assert heuristic.tail_block_m == 64
    at_128 = lambda c: fake_cost(c) - (20.0 if c.block_m == 128 else 0.0)
    cost = lambda c: at_128(c) + (5.0 if c.tail_block_m else 0.0)
    best, best_us, _ = search(heuristic, cost)
    assert best.block_m == 128 and best.tail_block_m == 0 and best_us == cost(best), (
        "toggled off where that wins")
    best, _, _ = search(heuristic, at_128)
    assert best.block_m == 128 and best.tail_block_m == 64, "kept where toggling does not win"


def test_search_survives_configurations_that_cannot_run():
    heuristic = default_config(1, 128, 8, 2048, 768)
    best, best_us, _ = search(heuristic, lambda c: float("inf") if c != heuristic else 50.0)
    assert best == heuristic and best_us == 50.0


class Interrupted(Exception):
    pass


def test_tune_saves_every_cell_and_resumes(tmp_path):
    path = tmp_path / "table.json"
    presets = [PRESETS["qwen3-30b-a3b"], PRESETS["mixtral-8x7b"]]
    calls, interrupt = [], [True]

    def measure(preset, m, config):
        calls.append((preset.name, m))
        if len(calls) == 40 and interrupt and interrupt.pop():
            raise Interrupted  # an interrupted run, once
        return fake_cost(config) * (2.0 if config == default_config(
            m, preset.num_experts, preset.top_k, preset.hidden, preset.inter) else 1.0)

    table = new_table("test", "bf16", "moekit tune", {})
    with pytest.raises(Interrupted):
        tune(table, path, presets, [1, 4096], measure, progress=lambda _: None)
    saved = load_table(path)
    assert 1 <= len(saved["entries"]) < 4, "cells finished before the interrupt are on disk"
    done = {(e["preset"], e["M"]) for e in saved["entries"]}
    calls.clear()
    tune(saved, path, presets, [1, 4096], measure, progress=lambda _: None)
    assert not done & set(calls), "finished cells are not measured again"
    final = load_table(path)
    assert len(final["entries"]) == 4
    assert all(e["use"] for e in final["entries"]), "2× faster than the heuristic beats 5%"
    for e in final["entries"]:  # every timing is kept, the best and the heuristic's among them
        timed = {json.dumps(t["config"]): t["us"] for t in e["trials"]}
        assert timed[json.dumps(e["config"])] == e["best_us"]
        assert e["heuristic_us"] in timed.values() and len(timed) > 10


def test_tune_keeps_the_heuristic_within_the_margin(tmp_path):
    table = new_table("test", "bf16", "moekit tune", {})
    tune(table, tmp_path / "t.json", [PRESETS["granite-3.0-3b-a800m"]], [64],
         lambda p, m, c: 100.0 - (0 if c == default_config(m, 40, 8, 1536, 512) else 1.0),
         margin=0.05, progress=lambda _: None)
    assert not table["entries"][0]["use"], "a 1% win is noise: the heuristic stays"


def test_lookup_takes_the_nearest_token_count_and_respects_use():
    tuned = ExpertsConfig(64, GemmConfig(128, 64), GemmConfig(256, 64))
    entry = lambda m, use: {"E": 8, "topk": 2, "H": 4096, "I": 14336, "M": m, "use": use,
                            "config": config_to_dict(tuned)}
    table = {"entries": [entry(64, True), entry(4096, False)]}
    assert config_from_dict(config_to_dict(tuned)) == tuned
    assert lookup(table, 8, 2, 4096, 14336, 64) == tuned
    assert lookup(table, 8, 2, 4096, 14336, 80) == tuned  # within a factor √2 of 64
    assert lookup(table, 8, 2, 4096, 14336, 100) is None, "too far from 64: the heuristic's"
    assert lookup(table, 8, 2, 4096, 14336, 1) is None, "a partial table does not stretch"
    assert lookup(table, 8, 2, 4096, 14336, 5000) is None  # nearest entry lost to the heuristic
    assert lookup(table, 8, 2, 4096, 1024, 100) is None  # another shape
    assert lookup(None, 8, 2, 4096, 14336, 100) is None
    json.dumps(table)  # entries are plain JSON


@pytest.mark.skipif(torch.cuda.is_available(), reason="tunes for real where CUDA is")
def test_tune_command_needs_cuda(capsys):
    from moekit.cli import main

    assert main(["tune", "--presets", "qwen3-30b-a3b"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_tune_starts_from_the_given_heuristic_and_its_tiles(tmp_path):
    # A kernel family with its own default (fp8's): the search starts there and, at the
    # other row tiles, from the same GEMM tiles rather than the bf16 heuristic's.
    own = ExpertsConfig(32, GemmConfig(128, 128, 8, 4, 4), GemmConfig(64, 128, 8, 4, 4))
    seen = []

    def measure(preset, m, config):
        seen.append(config)
        return fake_cost(config)

    table = new_table("test", "fp8_block", "moekit tune", {})
    tune(table, tmp_path / "t.json", [PRESETS["qwen3-30b-a3b"]], [64], measure,
         heuristic_for=lambda p, m: own, start_at=same_tiles_at, progress=lambda _: None)
    assert seen[0] == own, "the family's heuristic is timed first"
    assert same_tiles_at(own, 64) in seen and same_tiles_at(own, 16) in seen
    assert table["entries"][0]["heuristic_us"] == fake_cost(own)


def test_fp8_search_starts_at_the_direct_tiles_for_block_m_1():
    from moekit.experts_fp8 import direct_fp8_config
    from moekit.tuning.command import _fp8_tiles_at

    own = ExpertsConfig(16, GemmConfig(128, 128, 8, 4, 4), GemmConfig(64, 128, 8, 4, 4))
    start_at = _fp8_tiles_at("fp8_block")
    assert start_at(own, 1) == direct_fp8_config(1, 1, 0, 0, "fp8_block")
    assert start_at(own, 32) == same_tiles_at(own, 32)


def test_fp8_configurations_that_run_the_same_gluon_kernels_compare_equal():
    from moekit.tuning.command import config_as_run

    a = ExpertsConfig(128, GemmConfig(128, 256, 8, 8, 3), GemmConfig(128, 128, 8, 8, 4))
    b = ExpertsConfig(128, GemmConfig(256, 128, 8, 8, 3), GemmConfig(64, 128, 8, 4, 4))
    assert config_as_run(a, (False, False)) == a, "Triton GEMMs: the tiles matter"
    assert config_as_run(a, (True, True)) == config_as_run(b, (True, True))
    only2 = config_as_run(a, (False, True))
    assert only2.gemm1 == a.gemm1 and only2 == config_as_run(
        dataclasses.replace(a, gemm2=b.gemm2), (False, True))
    assert config_as_run(a, (True, False)) != config_as_run(b, (True, False))


def test_gluon_tiles_tie_and_the_heuristic_stays():
    # What `moekit tune --dtype fp8_*` times when both GEMMs are Gluon: every 128-row
    # configuration runs as the heuristic's, and a tie never replaces the heuristic.
    from moekit.tuning.command import config_as_run

    heuristic = ExpertsConfig(128, GemmConfig(128, 256, 8, 8, 3), GemmConfig(128, 128, 8, 8, 4))
    runs = {config_as_run(heuristic, (True, True)): 100.0}
    measure = lambda cfg: runs.get(config_as_run(cfg, (True, True)), 150.0 + cfg.block_m)
    best, best_us, heuristic_us = search(heuristic, measure, direct=False)
    assert best == heuristic and best_us == heuristic_us == 100.0


def test_gluon_gemms_off_the_gpu():
    from moekit.experts_fp8 import gluon_gemms
    from moekit.quant import QuantScheme, quantize_weight

    scheme = QuantScheme.fp8_tensor()
    w13 = quantize_weight(torch.randn(4, 512, 256), scheme.weight)
    w2 = quantize_weight(torch.randn(4, 256, 256), scheme.weight)
    assert gluon_gemms(torch.randn(8, 256), w13, w2, scheme, "silu", 128) == (False, False)


def cliff_table():
    entry = lambda m, h, b: {"preset": "qwen3-30b-a3b", "E": 128, "topk": 8, "H": 2048,
                             "I": 768, "M": m, "heuristic_us": h, "best_us": b, "use": h > b,
                             "config": config_to_dict(default_config(m, 128, 8, 2048, 768))}
    return {"device": "H100", "dtype": "bf16",
            "entries": [entry(1, 50.0, 49.0), entry(64, 120.0, 100.0),
                        entry(4096, 109.0, 100.0), entry(8192, 5.0, float("inf"))]}


def test_cliffs_are_cells_over_ten_percent_from_the_best():
    table = cliff_table()
    assert [e["M"] for e in cliffs(table)] == [64]  # 1.20×; 1.09× is within the bound
    lines = report(table)
    assert "4 cells" in lines[0] and "worst 1.200" in lines[1]
    assert "over 10% slower than the best: 1" in lines[2] and "M=64" in lines[3]


def test_tune_report_reads_a_table_without_cuda(tmp_path, capsys):
    from moekit.cli import main

    path = tmp_path / "table.json"
    path.write_text(json.dumps(cliff_table()))
    assert main(["tune", "--report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "qwen3-30b-a3b M=64" in out and "1.20×" in out
    assert main(["tune", "--report", str(tmp_path / "missing.json")]) == 2


def test_shipped_tables_are_valid_and_only_used_where_they_won():
    from moekit.quant import QuantScheme
    from moekit.tuning.tables import TABLE_DIR

    for path in sorted(TABLE_DIR.glob("*.json")):
        table = load_table(path)
        slug, dtype = path.stem.split("-fused_experts-")
        assert dtype in ("bf16", "fp16") or QuantScheme.parse(dtype).preset_name == dtype, path
        assert table["dtype"] == dtype and table["device"] and table["command"], path
        for e in table["entries"]:
            config_from_dict(e["config"])  # a valid configuration
            if e["use"]:
                assert e["best_us"] < 0.95 * e["heuristic_us"], (path.name, e["preset"], e["M"])


def test_gluon_gemm1_narrow_columns_where_few_tiles():
    # Fewer whole GEMM1 tiles than NARROW_COLUMNS_BELOW rounds of the SMs: narrow columns.
    from moekit.tuning.heuristic import NARROW_COLUMNS_BELOW, gluon_gemm1_narrow_columns
    granite = dict(num_experts=40, top_k=8, inter=512, num_sms=132)
    assert gluon_gemm1_narrow_columns(512, **granite), "40 row tiles × 4 column tiles = 160"
    assert gluon_gemm1_narrow_columns(1024, **granite), "80 × 4 = 320 < 330"
    assert not gluon_gemm1_narrow_columns(1536, **granite), "120 × 4 = 480"
    assert not gluon_gemm1_narrow_columns(512, 128, 8, 768, 132), "qwen3: 128 × 6"
    assert not gluon_gemm1_narrow_columns(4096, 8, 2, 14336, 132), "mixtral: 8 × 8 × 112"
    assert gluon_gemm1_narrow_columns(1536, 40, 8, 512, 2 * 132), "more SMs, more rounds"
    # At the boundary: one tile short of NARROW_COLUMNS_BELOW rounds of 66 SMs, and none.
    boundary = math.ceil(NARROW_COLUMNS_BELOW * 66)
    assert gluon_gemm1_narrow_columns(16, 1, 8, 128 * (boundary - 1), 66)
    assert not gluon_gemm1_narrow_columns(16, 1, 8, 128 * boundary, 66)


def test_tail_tiles_control_drops_the_128_row_tails(monkeypatch):
    # MOEKIT_TAIL_TILES=0 (read at import into TAIL_TILES): the same 128-row tiles, no tails.
    import dataclasses

    from moekit.tuning import heuristic

    qwen3 = (4096, 128, 8, 2048, 768, 2, 132)
    heuristic.default_config.cache_clear()
    with_tails = heuristic.default_config(*qwen3)
    assert with_tails.block_m == 128 and with_tails.tail_block_m == 64
    monkeypatch.setattr(heuristic, "TAIL_TILES", False)
    heuristic.default_config.cache_clear()
    try:
        without = heuristic.default_config(*qwen3)
    finally:
        heuristic.default_config.cache_clear()  # no tail-less entry outlives the patch
    assert without == dataclasses.replace(with_tails, tail_block_m=0)


@pytest.mark.parametrize("m, tails", [(1024, True), (1536, True), (2048, False),
                                      (8192, False)])
def test_mixtral_drops_tail_tiles_from_four_row_tiles_an_expert(m, tails):
    # Its w2 (117 MB an expert) outgrows L2: from 512 rows an expert tails cost more (in
    # DRAM reads) than they save; the same tiles either way.
    config = default_config(m, 8, 2, 4096, 14336)
    assert config.block_m == 128
    assert (config.tail_block_m == 64) is tails
    assert tail_tiles_desync(m, 8, 2, 4096, 14336) is not tails


def test_tail_tiles_stay_where_an_experts_w2_fits_l2():
    # deepseek-v3 (w2 29 MB an expert) at 512 rows an expert, and qwen3 at 2048.
    assert not tail_tiles_desync(16384, 256, 8, 7168, 2048)
    assert default_config(16384, 256, 8, 7168, 2048).tail_block_m == 64
    assert not tail_tiles_desync(32768, 128, 8, 2048, 768)
    # Mixtral in fp32 takes no tails at all; fp8 has its own tiles (`experts_fp8`).
    assert default_config(4096, 8, 2, 4096, 14336, dtype_bytes=4).tail_block_m == 0


def test_a_table_entry_on_the_removed_gathered_path_is_refused():
    # The gathered path was removed in session 76; a table written before names it. Read
    # without it, the entry would run kernels other than the ones it timed: refused, with
    # the path named. A missing key is every other entry's form.
    tuned = ExpertsConfig(16, GemmConfig(64, 128), GemmConfig(64, 128))
    data = config_to_dict(tuned)
    assert "gathered" not in data
    assert config_from_dict(data) == tuned
    table = {"entries": [{"E": 128, "topk": 8, "H": 2048, "I": 768, "M": 16, "use": True,
                          "config": {**data, "gathered": True}}]}
    with pytest.raises(ValueError, match="gathered path, removed in session 76"):
        lookup(table, 128, 8, 2048, 768, 16)
    with pytest.raises(ValueError, match="gathered"):
        config_from_dict({**data, "gathered": True})
