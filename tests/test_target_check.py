"""bench/scripts/target_check.py: the cells of a table under the issues' targets."""

import json

import pytest

from helpers import bench_script

target_check = bench_script("target_check")


def _row(M, pct, tflops, dtype="bf16", I=768, graph=True, bound="compute"):
    return {"preset": "p", "M": M, "I": I, "dtype": dtype, "impl": "moekit", "graph": graph,
            "roofline_pct": pct, "TFLOPs": tflops, "bound": bound}


def test_each_target_takes_its_cells():
    doc = {"ceilings": {"bf16_TFLOPs": 700.0, "fp8_TFLOPs": 1400.0}, "rows": [
        _row(1, 84.0, 1.0),            # decode under 85%, and fine for no-cliff
        _row(64, 85.0, 50.0),          # decode at the line: not a miss
        _row(1024, 59.0, 400.0),       # no cliff only (mid M has no decode/prefill line)
        _row(4096, 72.0, 480.0),       # roofline 72% but 480 / 700 = 69% of the peak
        _row(4096, 50.0, 100.0, I=512),  # I < 768: no prefill line for 16-bit, but a cliff
        _row(4096, 10.0, 1.0, graph=False),  # eager rows are not judged
    ]}
    misses = target_check.misses(doc)
    assert misses["decode"] == ["p M=1 84%"]
    assert misses["prefill (of peak)"] == ["p M=4096 69% (compute-bound)"]
    assert misses["prefill (roofline)"] == []
    assert misses["no cliff"] == ["p M=1024 59%", "p M=4096 50%"]


def test_fp8_prefill_line_is_55_percent_of_the_fp8_peak():
    doc = {"ceilings": {"bf16_TFLOPs": 700.0, "fp8_TFLOPs": 1000.0}, "rows": [
        _row(4096, 56.0, 560.0, dtype="fp8_block", I=512),
        _row(8192, 54.0, 540.0, dtype="fp8_block", I=512),
    ]}
    misses = target_check.misses(doc)
    assert misses["prefill (of peak)"] == ["p M=8192 54% (compute-bound)"]
    assert misses["prefill (roofline)"] == ["p M=8192 54%"]
    assert misses["no cliff"] == []  # a 16-bit line


def test_clock_line_names_the_peaks_and_the_cells_clocks():
    rows = [_row(1, 80.0, 1.0), _row(4096, 60.0, 400.0), _row(8192, 60.0, 400.0),
            _row(16384, 60.0, 400.0), _row(4096, 60.0, 400.0, graph=False)]
    for row, mhz in zip(rows, (1980, 1700, 1650, 1600, 900), strict=True):
        row["sm_clock_mhz"] = mhz
    doc = {"rows": rows, "clocks": {"ceilings": {
        "bandwidth": {"sm_clock_mhz": 1980}, "bf16": {"sm_clock_mhz": 1980, "power_w": 384},
        "fp8": {"sm_clock_mhz": 1410, "power_w": 429}}}}
    assert target_check.clock_line(doc) == (
        "- SM clocks: bf16 peak 1,980 MHz (384 W); fp8 peak 1,410 MHz (429 W); "
        "prefill cells median 1,650 MHz; decode cells median 1,980 MHz")


def test_clock_line_is_absent_from_tables_without_samples():
    assert target_check.clock_line({"rows": [_row(1, 80.0, 1.0)]}) is None


def test_prefill_misses_name_their_clock_where_sampled():
    doc = {"ceilings": {"bf16_TFLOPs": 700.0}, "rows": [
        dict(_row(4096, 64.0, 448.0), sm_clock_mhz=1575), _row(8192, 60.0, 420.0)]}
    assert target_check.misses(doc)["prefill (of peak)"] == [
        "p M=4096 64% (compute-bound, 1,575 MHz)", "p M=8192 60% (compute-bound)"]


def _floor_row(preset, M, mb, read_all, read_two, mem=None):
    row = {"preset": preset, "M": M, "w13_MB": mb * 2 / 3, "w2_MB": mb / 3,
           "read_all_us": read_all, "read_two_us": read_two}
    return row if mem is None else dict(row, mem_GBps=mem)


def test_launch_costs_are_the_median_reads_over_their_floor():
    # the floor in µs is MB × 1e3 / (GB/s): 3 MB at 1,000 GB/s is 3 µs
    doc = {"rows": [_floor_row("a", 1, 3.0, 8.0, 10.0, mem=1000.0),   # floor 3 µs: 5 / 7
                    _floor_row("b", 1, 6.0, 12.0, 14.5, mem=1000.0),  # floor 6: 6 / 8.5
                    _floor_row("c", 4, 9.0, 14.0, 16.0, mem=1000.0)]}  # floor 9: 5 / 7
    assert target_check.launch_costs(doc) == (5.0, 7.0)


def test_launch_costs_take_a_given_bandwidth_only_where_the_row_has_none():
    rows = [_floor_row("a", 1, 3.0, 8.0, 10.0), _floor_row("b", 1, 3.0, 8.0, 10.0, mem=500.0)]
    assert target_check.launch_costs({"rows": rows}, mem_gbps=1000.0) == (3.5, 5.5)
    with pytest.raises(ValueError, match="--mem-gbps"):
        target_check.launch_costs({"rows": rows[:1]})


def test_decode_misses_split_by_what_one_or_two_perfect_launches_reach():
    def cell(M, pct, floor):
        return dict(_row(M, pct, 1.0), floor_us=floor)
    doc = {"rows": [
        cell(1, 50.0, 10.0),   # 10 / 15 = 66%, 10 / 17 = 58%: out of reach in any form
        cell(2, 70.0, 40.0),   # 40 / 45 = 88%, 40 / 47 = 85.1%: reachable in two
        cell(4, 70.0, 35.0),   # 35 / 40 = 87.5%, 35 / 42 = 83.3%: one launch only
        cell(8, 86.0, 1.0),    # not a miss
        dict(cell(1, 10.0, 1.0), graph=False),  # eager: not judged
        cell(4096, 10.0, 1.0),  # not decode
    ]}
    reach = target_check.out_of_reach(doc, (5.0, 7.0))
    assert reach == {"one launch": ["p M=1 50% (at most 66% / 58%)"],
                     "two launches": ["p M=4 70% (at most 87% / 83%)"]}


def test_report_names_the_launch_costs_and_their_source(tmp_path):
    table = tmp_path / "t.json"
    table.write_text(json.dumps({
        "device": "X", "date": "d", "ceilings": {"bf16_TFLOPs": 700.0},
        "rows": [dict(_row(1, 50.0, 1.0), floor_us=10.0)]}))
    text = target_check.report([str(table)], (5.0, 7.0), "Y, `f.json`")
    assert ("- **decode out of reach** — a perfect read of a cell's bytes pays 5.0 µs over its "
            "floor in one launch, 7.0 in two (Y, `f.json`)") in text
    assert "in one launch or two: 1 cells — p M=1 50% (at most 66% / 58%)" in text
    assert "decode out of reach" not in target_check.report([str(table)])
