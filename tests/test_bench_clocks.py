"""moekit.bench.clocks: nvidia-smi's samples parsed, matched to each row's window, and
shown in the table; inert where there is no nvidia-smi."""

import time

import pytest

from moekit.bench import clocks
from moekit.bench.results import render_markdown

LINES = [
    "2026/12/05 09:17:11.100, 1980, 312.50",
    "2026/12/05 09:17:11.200, 1755, 690.10",
    "2026/12/05 09:17:11.300, 1605, [N/A]",   # a board without power readings
    "Failed to initialize NVML: Unknown Error",  # not a sample
    "2026/12/05 09:17:11.400, [N/A], 100",       # no clock: not a sample
]


def _t(ms: int) -> float:
    return clocks.parse_sample(f"2026/12/05 09:17:11.{ms:03d}, 1, 1")[0]


def test_parse_sample_keeps_samples_only():
    parsed = [clocks.parse_sample(line) for line in LINES]
    assert [p[1:] if p else None for p in parsed] == [
        (1980.0, 312.5), (1755.0, 690.1), (1605.0, None), None, None]
    assert parsed[1][0] - parsed[0][0] == pytest.approx(0.1, abs=1e-3)


def test_summarize_takes_the_window_only():
    samples = [clocks.parse_sample(line) for line in LINES[:3]]
    assert clocks.summarize(samples, _t(150), _t(350)) == {
        "sm_clock_mhz": 1680, "power_w": 690, "clock_samples": 2}
    assert clocks.summarize(samples, _t(310), _t(390)) is None  # shorter than the period


def test_annotate_adds_each_rows_clock_and_the_ceilings():
    samples = [clocks.parse_sample(line) for line in LINES[:3]]
    rows = [{"impl": "moekit", "graph": True, "window_s": [_t(50), _t(150)]},
            {"impl": "moekit", "graph": False, "window_s": [_t(250), _t(350)]},
            {"impl": "moekit", "graph": True, "window_s": None}]  # failed: no timing
    peaks = clocks.annotate(rows, {"bf16": [_t(150), _t(250)]}, samples)
    assert peaks == {"bf16": {"sm_clock_mhz": 1755, "power_w": 690, "clock_samples": 1}}
    assert rows[0]["sm_clock_mhz"] == 1980 and rows[1]["power_w"] is None
    assert "sm_clock_mhz" not in rows[2]
    assert clocks.annotate(rows, {}, []) is None


def test_window_records_the_blocks_span():
    spans = {}
    with clocks.window(spans, "x"):
        time.sleep(0.01)
    start, end = spans["x"]
    assert 0.005 < end - start < 1.0


def test_without_nvidia_smi_nothing_is_sampled(monkeypatch):
    monkeypatch.setattr(clocks.shutil, "which", lambda name: None)
    log = clocks.ClockLog("0")
    log.close()
    assert log.samples == [] and "no nvidia-smi" in log.error


def _fake_nvidia_smi(tmp_path, monkeypatch, body: str) -> None:
    """An nvidia-smi that runs the shell `body`, first on PATH for `clocks`."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n" + body + "\n")
    fake.chmod(0o755)
    monkeypatch.setattr(clocks.shutil, "which",
                        lambda name: str(fake) if name == "nvidia-smi" else None)


def test_a_failing_nvidia_smi_says_so(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, "echo 'No devices were found' >&2; exit 6")
    log = clocks.ClockLog("GPU-x")
    time.sleep(0.2)
    log.close()
    assert log.samples == [] and log.error == "nvidia-smi exited (6) with no samples"


def test_a_sampling_nvidia_smi_is_read_and_stopped(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, "while true; do "
                     "date '+%Y/%m/%d %H:%M:%S.000, 1500, 400'; sleep 0.05; done")
    log = clocks.ClockLog("0")
    time.sleep(0.5)
    log.close()
    assert log.samples and log.error is None
    assert {s[1:] for s in log.samples} == {(1500.0, 400.0)}


def _doc(rows, clocks_json):
    return {"device": "GPU X", "date": "2026-12-05", "command": "moekit bench", "torch": "2",
            "triton": "3", "ceilings": {"copy_GBps": 1.0, "read_GBps": 1.0, "mem_GBps": 1.0,
                                        "bf16_TFLOPs": 1.0, "fp8_TFLOPs": None},
            "rows": rows, "clocks": clocks_json}


def _row(mhz):
    return {"preset": "p", "M": 1, "impl": "moekit", "graph": True, "time_us": 1.0,
            "roofline_pct": 50.0, "rel_err": 1e-3, "sm_clock_mhz": mhz}


def test_markdown_states_the_peaks_and_cells_clocks():
    doc = _doc([_row(1500), _row(1700), _row(1980)],
               {"ceilings": {"bandwidth": {"sm_clock_mhz": 1980, "power_w": 300},
                             "bf16": {"sm_clock_mhz": 1755, "power_w": 690}, "fp8": None},
                "note": None})
    text = render_markdown(doc)
    assert ("- SM clock (nvidia-smi, median within each measurement): bf16 peak 1,755 MHz / "
            "690 W; moekit's graph cells 1,500–1,980 MHz (median 1,700)") in text
    doc["clocks"] = {"ceilings": None, "note": "no nvidia-smi on PATH: clocks not sampled"}
    assert "- clocks: no nvidia-smi on PATH: clocks not sampled" in render_markdown(doc)


def test_a_failing_annotation_keeps_the_table(monkeypatch):
    from moekit.bench import command

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(clocks, "annotate", broken)
    log = type("Log", (), {"samples": [(1.0, 1500.0, 400.0)], "error": None})()
    assert command._clocks([{"window_s": [0.0, 2.0]}], {}, log) == {
        "note": "clock annotation failed: RuntimeError('boom')"}
