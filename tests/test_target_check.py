"""bench/scripts/target_check.py: the cells of a table under the issues' targets."""

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
