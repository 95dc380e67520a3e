"""The routing/permute table's host logic: floor bytes, set and graph sizing, Markdown.

The timing itself needs CUDA (the GPU run commits its result file); what is checked here
is the arithmetic a reader of that file relies on.
"""

import pytest

from moekit.bench.routing_table import (
    L2_MULTIPLE,
    MAX_CALLS_PER_GRAPH,
    calls_per_graph,
    op_bytes,
    render_routing_markdown,
    sets_needed,
)

SIZE = {"m": 4096, "E": 64, "k": 8, "H": 2048, "elem": 2, "capacity": 40960, "used": 36736,
        "block_m": 128, "kept": 4096 * 8}


def test_permute_floor_reads_each_hidden_row_once():
    # The floor is DRAM traffic the op cannot avoid: M rows read, used slots written,
    # pair_slots and sorted_pairs read; never the k-fold re-reads L2 may serve.
    got = op_bytes("permute", **SIZE)
    assert got == (4096 + 36736) * 2048 * 2 + 4 * (4096 * 8 + 40960)


def test_unpermute_floor_reads_each_kept_slot_once():
    got = op_bytes("unpermute", **SIZE)
    assert got == (4096 * 8 + 4096) * 2048 * 2 + 8 * 4096 * 8


def test_unknown_op():
    with pytest.raises(ValueError, match="unknown op"):
        op_bytes("combine", **SIZE)


@pytest.mark.parametrize("nbytes,expected", [
    (32, 16),  # decode: tiny sets, the cap applies (they stay in L2, as in a model)
    (50 * 2**20, 1 + L2_MULTIPLE),  # one set as large as L2: the others cover 3 × L2
    (4 * 2**30, 2),  # prefill: two sets always, so no call reuses its predecessor's inputs
])
def test_sets_cover_l2(nbytes, expected):
    assert sets_needed(nbytes, 50 * 2**20, 16) == expected


@pytest.mark.parametrize("call_us,sets,expected", [
    (3.0, 16, 80),  # a 3 µs op: 5 rounds of 16 sets ≥ 200 µs
    (0.5, 16, MAX_CALLS_PER_GRAPH),  # capped
    (1300.0, 2, 2),  # one round when one call already exceeds the budget
])
def test_calls_per_graph(call_us, sets, expected):
    n = calls_per_graph(call_us, sets, 200)
    assert n == expected and n % sets == 0


def test_markdown_has_one_table_per_op_and_flags_failed_checks():
    rows = [{"preset": "olmoe-1b-7b", "M": m, "op": op, "time_us": t, "GBps": 2500.0,
             "copy_pct": 83.0, "check": "ok" if op == "route" else "rows differ"}
            for m, t in ((1, 2.5), (4096, 150.0)) for op in ("route", "permute")]
    doc = {"title": "moekit routing and permute table", "device": "GPU",
           "date": "2026-11-24T00:00:00", "command": "moekit bench routing", "torch": "x",
           "triton": "y", "cuda": "z", "moekit": "0", "ceilings": {"copy_GBps": 3000.0},
           "notes": ["a note"], "rows": rows}
    md = render_routing_markdown(doc)
    assert "## route" in md and "## permute" in md and "- a note" in md
    assert "| olmoe-1b-7b | 2.5 (2,500 GB/s, 83%) | 150 (2,500 GB/s, 83%) |" in md
    assert "150 (2,500 GB/s, 83%) ⚠" in md and "check failed: olmoe-1b-7b M=1 permute" in md
