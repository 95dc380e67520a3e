"""bench/scripts/plan_decode_tiles_experiment.py: its variants each change the heuristic's
plan-path tiles, its cells parse strictly, and its table lays the ratios out."""

import argparse

import pytest

from helpers import bench_script
from moekit.bench.presets import PRESETS


@pytest.fixture(scope="module")
def experiment():
    return bench_script("plan_decode_tiles_experiment")


@pytest.mark.parametrize("dtype", ["fp8_tensor", "bf16"])
def test_cells_take_the_plan_path_and_variants_change_one_gemm(experiment, dtype):
    for name, m in experiment.CELLS:
        base = experiment.heuristic(PRESETS[name], m, dtype)
        assert base.block_m == 16, (name, m, "the plan path's 16-row blocks")
        for gemm, change in experiment.VARIANTS.values():
            other = experiment.variant(base, gemm, change)
            kept = "gemm2" if gemm == "gemm1" else "gemm1"
            assert getattr(other, kept) == getattr(base, kept)
            assert all(getattr(getattr(other, gemm), k) == v for k, v in change.items())


def test_cells_parse_strictly(experiment):
    assert experiment.parse_cell("qwen3-30b-a3b:16") == ("qwen3-30b-a3b", 16)
    for bad in ("qwen3-30b-a3b", "qwen3-30b-a3b:0", "nope:8", "qwen3-30b-a3b:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            experiment.parse_cell(bad)


def test_table_shows_ratios_and_gaps(experiment):
    rows = [{"preset": "p", "M": 8, "dtype": "fp8_tensor", "variants": {
        "heuristic": {"us": 100.0, "ratio": 1.0, "rel_diff": 0.0},
        "g1 stages 3": {"us": 97.0, "ratio": 1.031, "rel_diff": 2e-3},
        "g2 n32": {"error": "OutOfResources: shared memory"}}}]
    lines = experiment.table(rows, list(experiment.VARIANTS))
    assert lines[2] == "| p | 8 | fp8_tensor | 100.0 | 1.031 | — | — | — | error | — |"
    assert experiment.table(rows, ["g2 n32"])[2] == "| p | 8 | fp8_tensor | 100.0 | error |"
    assert lines[-1] == "Largest output difference from the heuristic's: 2.00e-03."
