"""`moekit.bench.experiment_files`: the environment record and the two files of a
bench/scripts experiment."""

import json

from moekit.bench.experiment_files import experiment_meta, rows_table, write_experiment


def test_meta_names_the_run(monkeypatch):
    monkeypatch.setenv("MOEKIT_GIT_COMMIT", "abc1234")
    meta = experiment_meta(blocks=3)
    assert meta["code"] == "abc1234" and meta["blocks"] == 3
    assert list(meta)[:6] == ["device", "torch", "triton", "date", "command", "code"]


def test_files_hold_the_rows_and_the_page(tmp_path):
    meta = {"device": "GPU X", "torch": "2.x", "triton": "3.y", "date": "2026-12-04",
            "command": "bench/scripts/e.py --out o", "code": "abc1234"}
    rows = [{"preset": "p", "us": 1.5}]
    write_experiment(str(tmp_path / "out"), "e-s1", meta, rows, "An experiment",
                     ["- note one", "- note two"], ["| preset | us |", "|---|---|", "| p | 1.5 |"])
    assert json.loads((tmp_path / "out" / "e-s1.json").read_text()) == {"meta": meta,
                                                                         "rows": rows}
    assert (tmp_path / "out" / "e-s1.md").read_text().split("\n") == [
        "# An experiment — GPU X, 2026-12-04", "",
        "- command: `bench/scripts/e.py --out o` (code abc1234)", "- torch 2.x, triton 3.y",
        "- note one", "- note two", "", "| preset | us |", "|---|---|", "| p | 1.5 |", ""]


def test_rows_table_lays_out_the_chosen_keys():
    rows = [{"M": 2048, "tail µs": 12.5, "rounds": [1]}, {"M": 4096, "tail µs": 30.0,
                                                          "rounds": [2]}]
    assert rows_table(rows, ["M", "tail µs"]) == [
        "| M | tail µs |", "|---|---|", "| 2048 | 12.5 |", "| 4096 | 30.0 |"]
