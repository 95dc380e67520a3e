"""bench/scripts/compare_tables.py: A/B of `moekit bench` tables, the cells every version
timed, medians over rounds, ratios to the baseline."""

import json

from helpers import bench_script

compare_tables = bench_script("compare_tables")


def _doc(times: dict, err=1e-3, graph=True, extra_rows=()):
    rows = [{"preset": p, "M": m, "dtype": "bf16", "impl": "moekit", "graph": graph,
             "time_us": us, "rel_err": err, "roofline_pct": 50.0} for (p, m), us in times.items()]
    rows.append({"preset": "q", "M": 1, "dtype": "bf16", "impl": "torch_grouped_mm",
                 "graph": graph, "time_us": 1.0, "rel_err": 0.0, "roofline_pct": 99.0})
    return {"device": "GPU X", "torch": "2.x", "triton": "3.y", "date": "2026-12-04",
            "command": "moekit bench", "git_commit": "abc", "rows": rows + list(extra_rows)}


def _write(tmp_path, name, doc):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_medians_ratios_and_common_cells(tmp_path):
    a1 = _write(tmp_path, "a1.json", _doc({("q", 1): 10.0, ("q", 8): 20.0, ("g", 1): 5.0}))
    a2 = _write(tmp_path, "a2.json", _doc({("q", 1): 12.0, ("q", 8): 22.0, ("g", 1): 5.0}))
    b1 = _write(tmp_path, "b1.json", _doc({("q", 1): 8.0, ("q", 8): 21.0}, err=2e-3))
    b2 = _write(tmp_path, "b2.json", _doc({("q", 1): 14.0, ("q", 8): 21.0}, graph=False))
    compare_tables.main(["--out", str(tmp_path / "o"), "--stem", "ab", f"main={a1},{a2}",
                         f"cand={b1},{b2}"])
    rows = json.loads((tmp_path / "o" / "ab.json").read_text())["rows"]
    # g is missing from cand; b2's rows are eager, so cand has one graph round per cell.
    assert [(r["preset"], r["M"]) for r in rows] == [("q", 1), ("q", 8)]
    q1 = rows[0]
    assert q1["main_us"] == 11.0 and q1["cand_us"] == 8.0
    assert q1["cand_ratio"] == round(11.0 / 8.0, 3) and q1["main_ratio"] == 1.0
    assert q1["cand_rel_err"] == 2e-3 and q1["main_rounds"] == [10.0, 12.0]
    page = (tmp_path / "o" / "ab.md").read_text()
    assert "| bf16 | q | 1 | 11.0 (50.0%) | 8.0 (50.0%) | 1.375 |" in page


def test_eager_rows_on_request(tmp_path):
    a = _write(tmp_path, "a.json", _doc({("q", 1): 30.0}, graph=False))
    b = _write(tmp_path, "b.json", _doc({("q", 1): 20.0}, graph=False))
    compare_tables.main(["--out", str(tmp_path), "--stem", "e", "--eager", f"a={a}", f"b={b}"])
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert rows[0]["b_ratio"] == 1.5 and rows[0]["graph"] is False


def test_clocks_where_the_tables_recorded_them(tmp_path):
    clocked = _doc({("q", 1): 10.0}, extra_rows=())
    for row in clocked["rows"]:
        row["sm_clock_mhz"] = 1755
    a = _write(tmp_path, "a.json", clocked)
    b = _write(tmp_path, "b.json", _doc({("q", 1): 12.0}))  # an older table: no clocks
    compare_tables.main(["--out", str(tmp_path / "o"), "--stem", "ab", f"main={a}", f"old={b}"])
    doc = json.loads((tmp_path / "o" / "ab.json").read_text())
    assert doc["rows"][0]["main_sm_clock_mhz"] == 1755
    assert "old_sm_clock_mhz" not in doc["rows"][0]
    text = (tmp_path / "o" / "ab.md").read_text()
    assert "- median SM clock of the cells, MHz: main 1,755" in text
