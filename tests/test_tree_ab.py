"""bench/scripts/tree_ab.py: version specs with their environment, nvidia-smi's samples
matched to each cell's timing window."""

import pytest

from helpers import bench_script

tree_ab = bench_script("tree_ab")


def test_version_spec_carries_its_environment():
    assert tree_ab._parse_version("v5=/tmp/v5/src") == ("v5", "/tmp/v5/src", {})
    assert tree_ab._parse_version("g0=src,MOEKIT_GLUON=0,X=a=b") == (
        "g0", "src", {"MOEKIT_GLUON": "0", "X": "a=b"})


def test_a_value_may_hold_commas():
    assert tree_ab._parse_version("p2f=src,MOEKIT_GEMM1_PERSISTENT=2,flat,Y=1") == (
        "p2f", "src", {"MOEKIT_GEMM1_PERSISTENT": "2,flat", "Y": "1"})
    with pytest.raises(ValueError, match="names no VAR=value"):
        tree_ab._parse_version("bad=src,flat")


def test_samples_inside_a_window_give_median_clock_power_and_reasons(tmp_path):
    log = tmp_path / "clocks.csv"
    log.write_text(
        "2026/12/05 10:00:00.000, 1980 MHz, 300.00 W, 0x0000000000000000\n"
        "2026/12/05 10:00:00.100, 1700 MHz, 650.50 W, 0x0000000000000004\n"
        "not a sample line\n"
        "2026/12/05 10:00:00.200, 1755 MHz, 690.00 W, 0x0000000000000004\n"
        "2026/12/05 10:00:05.000, 1980 MHz, 100.00 W, 0x0000000000000000\n")
    samples = tree_ab._samples(str(log))
    assert len(samples) == 4
    t0 = samples[0][0]
    mhz, watts, reasons = tree_ab._in_window(samples, [t0 + 0.05, t0 + 0.25])
    assert (mhz, watts, reasons) == (1727.5, 670.25, "0x0000000000000004")
    assert tree_ab._in_window(samples, [t0 + 1, t0 + 2]) == (None, None, None)
