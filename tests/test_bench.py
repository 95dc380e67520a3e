"""Tests of the benchmark harness: roofline arithmetic, inputs, baselines, result files.

Everything here runs on the CPU in seconds; the CUDA timing paths are marked `gpu`.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import assert_close
from moekit import reference
from moekit.bench.baselines import grouped_layout, torch_grouped_mm, torch_loop
from moekit.bench.ceilings import Ceilings
from moekit.bench.inputs import (
    experts_hit,
    make_tokens,
    make_weights,
    reference_rows,
    rel_err,
    skew_offsets,
)
from moekit.bench.presets import ALL_PRESETS, PRESETS, TOKEN_COUNTS, Preset, cpu_preset
from moekit.bench.results import render_markdown, result_paths, validate
from moekit.bench.roofline import Cost, achieved, expert_bytes, moe_cost
from moekit.bench.table import TableConfig, implementations, make_row, run_table
from moekit.bench.timing import CpuTimer, Timing
from moekit.device import device_slug

CPU = torch.device("cpu")

# PERF.md, "Result files": the keys every document and row must carry.
PERF_TOP_KEYS = {"device", "torch", "triton", "date", "command", "ceilings", "rows"}
PERF_CEILING_KEYS = {"copy_GBps", "bf16_TFLOPs", "fp8_TFLOPs", "read_GBps", "mem_GBps"}
PERF_ROW_KEYS = {"preset", "E", "topk", "H", "I", "M", "dtype", "impl", "graph", "time_us",
                 "floor_us", "roofline_pct", "GBps", "TFLOPs", "rel_err"}


# ------------------------------------------------------------------------------ roofline


def test_roofline_hand_computed_memory_bound():
    # M=4, k=2, H=8, I=4, gated (rows13 = 8), 3 experts hit, bf16:
    # expert = (8·8 + 8·4)·2 = 192 B; bytes = 3·192 + 4·8·2 (hidden) + 4·8·2 (out) = 704
    # flops = 2·4·2·(8·8 + 4·8) = 1536
    cost = moe_cost(4, 2, 8, 4, 8, experts_hit=3, weight_bytes=2, act_bytes=2)
    assert cost == Cost(bytes=704, flops=1536)
    # 1 GB/s = 1e3 B/µs → 0.704 µs; 1e-3 TFLOP/s = 1e3 flop/µs → 1.536 µs: compute-bound
    assert cost.floor_us(1.0, 1e-3) == pytest.approx(1.536)
    assert cost.bound(1.0, 1e-3) == "compute"
    # with a 100× faster matmul it is memory-bound at 0.704 µs
    assert cost.floor_us(1.0, 0.1) == pytest.approx(0.704)
    assert cost.bound(1.0, 0.1) == "memory"


def test_roofline_bias_and_relu2():
    # Biases add rows13 + H elements per expert: (8 + 8)·2 = 32 B on top of 192.
    assert expert_bytes(8, 4, 8, 2, bias=True, bias_bytes=2) == 192 + 32
    # relu2 has no gate: rows13 = I, flops = 2·M·k·2I·H (PERF.md's "otherwise" case).
    cost = moe_cost(4, 2, 8, 4, 4, experts_hit=1, weight_bytes=2, act_bytes=2)
    assert cost.flops == 2 * 4 * 2 * (2 * 4 * 8)


def test_achieved_rates():
    gbps, tflops = achieved(Cost(bytes=3e6, flops=2e9), time_us=1000.0)
    assert gbps == pytest.approx(3.0)  # 3 MB in 1 ms
    assert tflops == pytest.approx(2.0)  # 2 GFLOP in 1 ms


def test_make_row_derives_rates_from_the_floor():
    preset = Preset("toy", 4, 2, 8, 4)
    ceilings = Ceilings(copy_GBps=1.0, read_GBps=2.0, bf16_TFLOPs=0.1)
    cost = moe_cost(4, 2, 8, 4, 8, experts_hit=3, weight_bytes=2, act_bytes=2)
    config = TableConfig(presets=(preset,), tokens=(4,))
    row = make_row(preset, 4, config, "moekit", False, Timing(10.0, 9.0, 11.0, 5), cost,
                   ceilings, 1e-3, hit=3, checked_rows=4, note=None)
    assert row["floor_us"] == pytest.approx(0.352)  # 704 B at mem = max(copy, read) = 2 GB/s
    assert row["roofline_pct"] == pytest.approx(3.52)
    assert row["GBps"] == pytest.approx(70.4e-3)
    assert row["rel_err_ok"] is True


# ------------------------------------------------------------------------------- presets


def test_presets_are_perf_md_table():
    expected = {  # PERF.md, "Presets (E, top-k, H, I)"
        "mixtral-8x7b": (8, 2, 4096, 14336, "silu"),
        "deepseek-v2-lite": (64, 6, 2048, 1408, "silu"),
        "qwen3-30b-a3b": (128, 8, 2048, 768, "silu"),
        "olmoe-1b-7b": (64, 8, 2048, 1024, "silu"),
        "granite-3.0-3b-a800m": (40, 8, 1536, 512, "silu"),
        "gpt-oss-120b": (128, 4, 2880, 2880, "swigluoai"),
        "deepseek-v3": (256, 8, 7168, 2048, "silu"),
    }
    got = {p.name: (p.num_experts, p.top_k, p.hidden, p.inter, p.activation)
           for p in PRESETS.values()}
    assert got == expected
    assert PRESETS["gpt-oss-120b"].bias and not PRESETS["qwen3-30b-a3b"].bias
    assert TOKEN_COUNTS == tuple(2**i for i in range(15))


@pytest.mark.parametrize("name", list(ALL_PRESETS))
def test_cpu_presets_are_small_and_keep_the_kind(name):
    full = ALL_PRESETS[name]
    small = cpu_preset(full)
    assert small.num_experts <= 16 and small.top_k <= small.num_experts
    assert small.hidden % 16 == 0 and small.inter % 16 == 0 and small.hidden <= 256
    assert (small.activation, small.bias) == (full.activation, full.bias)


# -------------------------------------------------------------------------------- inputs


def test_inputs_are_seeded_finite_and_nonzero():
    preset = cpu_preset(PRESETS["gpt-oss-120b"])
    w = make_weights(preset, torch.bfloat16, CPU, seed=3)
    assert w.w13.shape == (preset.num_experts, 2 * preset.inter, preset.hidden)
    assert w.b13 is not None and w.b2.shape == (preset.num_experts, preset.hidden)
    assert torch.equal(w.w13, make_weights(preset, torch.bfloat16, CPU, seed=3).w13)
    hidden, topk = make_tokens(preset, 16, torch.bfloat16, CPU, seed=3)
    assert hidden.abs().sum() > 0 and torch.isfinite(hidden).all()
    assert topk.ids.dtype == torch.int32 and topk.weights.dtype == torch.float32
    torch.testing.assert_close(topk.weights.sum(-1), torch.ones(16))


def test_skewed_routing_concentrates_load():
    preset = Preset("toy", 64, 4, 16, 16)
    _, balanced = make_tokens(preset, 2048, torch.float32, CPU, "balanced")
    _, skewed = make_tokens(preset, 2048, torch.float32, CPU, "skewed")
    top8_share = lambda ids: torch.bincount(ids.flatten().long(), minlength=64).sort(
        descending=True).values[:8].sum().item() / ids.numel()
    assert top8_share(balanced.ids) < 0.25 < 0.75 < top8_share(skewed.ids)
    offsets = skew_offsets(64)
    assert offsets.max() == 0 and sorted(offsets.tolist(), reverse=True)[1] < 0


def test_experts_hit_and_reference_rows():
    ids = torch.tensor([[0, 3], [3, 5], [-1, 9]], dtype=torch.int32)
    assert experts_hit(ids, num_experts=6) == 3  # -1 and 9 are outside [0, 6)
    assert reference_rows(100, 256) is None
    rows = reference_rows(1000, 256)
    assert len(rows) == 256 and torch.equal(rows, rows.sort().values)
    assert len(set(rows.tolist())) == 256


def test_rel_err_on_row_subset_and_nonfinite():
    ref = torch.ones(2, 4)
    out = torch.ones(5, 4)
    out[3] = 1.5
    assert rel_err(out, ref, torch.tensor([1, 3])) == pytest.approx(0.5 / math.sqrt(2))
    out[1, 0] = float("nan")
    assert rel_err(out, ref, torch.tensor([1, 3])) == float("inf")


# ----------------------------------------------------------------------------- baselines

# Each case: (E, k, H, I, activation, bias, M) and why it is here.
BASELINE_CASES = [
    (8, 2, 32, 16, "silu", False, 12),  # plain SwiGLU, a few tokens per expert
    (5, 3, 48, 32, "swigluoai", True, 7),  # gpt-oss activation with both biases, E odd
    (4, 1, 16, 16, "relu2", False, 9),  # no gate: w13 holds I rows
    (16, 4, 32, 16, "gelu", False, 1),  # one token: most experts empty
]


@pytest.mark.parametrize("fn", [torch_loop, torch_grouped_mm], ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", BASELINE_CASES, ids=lambda c: f"{c[4]}-E{c[0]}-M{c[6]}")
def test_baselines_match_reference(fn, case):
    e, k, h, i, act, bias, m = case
    preset = Preset("case", e, k, h, i, act, bias)
    w = make_weights(preset, torch.float32, CPU, seed=1)
    hidden, topk = make_tokens(preset, m, torch.float32, CPU, seed=1)
    try:
        out = fn(hidden, w.w13, w.w2, topk.ids, topk.weights, activation=act, b13=w.b13, b2=w.b2)
    except (RuntimeError, NotImplementedError) as exc:  # _grouped_mm is CUDA-only in older torch
        pytest.skip(f"{fn.__name__} does not run on this CPU build: {exc}")
    ref = reference.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights, activation=act,
                                  b13=w.b13, b2=w.b2)
    assert_close(out, ref, tol=1e-5)


def test_baselines_bf16_within_design_tolerance():
    preset = cpu_preset(PRESETS["qwen3-30b-a3b"])
    w = make_weights(preset, torch.bfloat16, CPU)
    hidden, topk = make_tokens(preset, 16, torch.bfloat16, CPU)
    ref = reference.fused_experts(hidden.float(), w.w13, w.w2, topk.ids, topk.weights)
    out = torch_loop(hidden, w.w13, w.w2, topk.ids, topk.weights)
    assert rel_err(out, ref, None) < 1e-2


# Each case: ids and why.
LAYOUT_CASES = [
    ([[2, 0], [0, 1], [2, 1]], "a mix, ties keep pair order"),
    ([[1, 1], [1, 1]], "every pair on one expert, the others empty"),
    ([[4, 0, 2]], "one token, E = 5 not a power of two, gaps"),
]


@pytest.mark.parametrize("ids,why", LAYOUT_CASES, ids=[c[1] for c in LAYOUT_CASES])
def test_grouped_layout_exact(ids, why):
    topk_ids = torch.tensor(ids, dtype=torch.int32)
    num_experts = 5
    layout = grouped_layout(topk_ids, num_experts)
    flat = topk_ids.flatten().long()
    k = topk_ids.shape[1]
    # order is a permutation that sorts by expert, stable within an expert
    assert sorted(layout.order.tolist()) == list(range(flat.numel()))
    expected_order = sorted(range(flat.numel()), key=lambda p: (flat[p].item(), p))
    assert layout.order.tolist() == expected_order
    assert torch.equal(layout.experts, flat[layout.order])
    assert torch.equal(layout.tokens, layout.order // k)
    counts = torch.bincount(flat, minlength=num_experts)
    assert layout.offs.dtype == torch.int32
    assert layout.offs.tolist() == counts.cumsum(0).tolist()
    assert layout.offs[-1] == flat.numel()


# ------------------------------------------------------------------------- result files


@pytest.mark.parametrize("name,slug", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA GH200 480GB", "gh200"),
    ("cpu", "cpu"),
    ("Some Odd GPU (rev 2)", "some-odd-gpu-rev-2"),
])
def test_device_slug(name, slug):
    assert device_slug(name) == slug


def test_result_paths_never_overwrite(tmp_path):
    first = result_paths(tmp_path, "cpu", "20260101", "kernels-bf16")
    assert first[0].name == "cpu-20260101-kernels-bf16.json"
    first[0].write_text("{}")
    second = result_paths(tmp_path, "cpu", "20260101", "kernels-bf16")
    assert second[1].name == "cpu-20260101-kernels-bf16-2.md"


def _tiny_table(impls=None, tokens=(1, 5)):
    presets = (cpu_preset(PRESETS["granite-3.0-3b-a800m"]), cpu_preset(PRESETS["gpt-oss-120b"]))
    config = TableConfig(presets=presets, tokens=tokens, ref_rows=4)
    ceilings = Ceilings(copy_GBps=10.0, read_GBps=12.0, bf16_TFLOPs=0.05)
    rows = list(run_table(config, impls or implementations(True), CpuTimer(budget_ms=1),
                          ceilings, CPU))
    return rows, ceilings


def test_cpu_table_rows_carry_perf_md_keys():
    rows, ceilings = _tiny_table()
    assert len(rows) == 2 * 2 * 3  # presets × tokens × impls, eager only on the CPU
    for row in rows:
        assert PERF_ROW_KEYS <= row.keys()
        assert row["time_us"] > 0 and row["floor_us"] > 0 and not row["graph"]
        assert row["rel_err"] < 1e-2, row
    # M=5 > ref_rows=4: the check ran on a 4-row sample
    assert {r["rel_err_rows"] for r in rows if r["M"] == 5} == {4}
    doc = {"device": "cpu", "torch": "x", "triton": "y", "date": "2026-01-01T00:00:00",
           "command": "moekit bench", "ceilings": ceilings.to_json(), "rows": rows}
    assert validate(doc) == []
    assert PERF_CEILING_KEYS <= doc["ceilings"].keys()
    assert doc["ceilings"]["mem_GBps"] == 12.0
    json.dumps(doc, allow_nan=False)  # strict JSON: no NaN/inf sneaks in
    md = render_markdown(doc)
    assert "## moekit, eager" in md and "| granite-3.0-3b-a800m |" in md and "M=5" in md


def test_failing_impl_becomes_a_note():
    from moekit.bench.table import Impl

    def broken(*args, **kwargs):
        raise RuntimeError("kernel not ready\nsecond line")

    rows, _ = _tiny_table([Impl("moekit", broken)], tokens=(1,))
    assert all(r["time_us"] is None and r["note"].startswith("failed: RuntimeError") for r in rows)
    assert "second line" not in rows[0]["note"]
    assert validate({"device": 0, "torch": 0, "triton": 0, "date": 0, "command": 0,
                     "ceilings": Ceilings(1.0, 1.0, 1.0).to_json(), "rows": rows}) == []


def test_validate_reports_missing_keys():
    problems = validate({"rows": [{"preset": "x"}], "ceilings": {}})
    assert "missing top-level key 'device'" in problems
    assert "missing ceilings key 'read_GBps'" in problems
    assert "row 0: missing key 'roofline_pct'" in problems


@pytest.mark.parametrize("kind", ["read", "zero"])
def test_l2_flush_touches_its_whole_buffer(kind):
    from moekit.bench.l2_flush import L2Flush

    flush = L2Flush(kind, device="cpu")
    flush._buffer[::4096] = 7  # a flush must reach every part of the 256 MB
    flush()
    if kind == "read":
        assert flush._sum.item() == flush._buffer.numel() + 6 * math.ceil(
            flush._buffer.numel() / 4096)
    else:
        assert not flush._buffer.any()
    assert flush._buffer.numel() * flush._buffer.element_size() == 256 * 2**20


@pytest.mark.interpreter
def test_stream_read_reads_every_element_once():
    from moekit.bench.stream_read import BLOCK, UNROLL, stream_read

    x = torch.randn(3 * BLOCK * UNROLL, generator=torch.Generator().manual_seed(1))
    partials = torch.full((3,), float("nan"))
    stream_read(x, partials)  # interpreted on the CPU
    torch.testing.assert_close(partials, x.view(3, -1).sum(1), atol=1e-3, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of"):
        stream_read(x[:-1])


def test_l2_flush_refuses_unknown_kinds():
    from moekit.bench.l2_flush import L2Flush

    with pytest.raises(ValueError, match="expected one of"):
        L2Flush("none", device="cpu")


# ------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
def test_cuda_timer_eager_and_graph():
    from moekit.bench.timing import CudaTimer

    timer = CudaTimer(warmup_ms=2, rep_ms=5, back_to_back_ms=2)
    x = torch.randn(1 << 20, device="cuda")
    eager = timer.eager(lambda: x * 2)
    assert eager.median_us > 0 and eager.reps >= 1 and eager.back_to_back_us > 0
    timing, err = timer.graph(lambda: x * 2, lambda out: rel_err(out, x * 2, None))
    assert timing.median_us > 0 and err == 0.0
    zero = CudaTimer(warmup_ms=2, rep_ms=5, back_to_back_ms=0, l2_flush="zero")
    assert zero.eager(lambda: x * 2).median_us > 0


@pytest.mark.gpu
def test_cuda_timer_reports_capture_failure_and_recovers():
    from moekit.bench.timing import CaptureFailed, CudaTimer

    stream = torch.cuda.current_stream()
    x = torch.randn(16, device="cuda")
    with pytest.raises(CaptureFailed):
        CudaTimer(rep_ms=5).graph(lambda: x * x.sum().item(), lambda out: 0.0)
    assert torch.cuda.current_stream() == stream
    assert (x + 1).sum().item() == pytest.approx(x.sum().item() + 16, rel=1e-4)


@pytest.mark.gpu
def test_grouped_mm_baseline_captures_on_cuda():
    from moekit.bench.timing import CudaTimer

    preset = Preset("toy", 8, 2, 64, 32)
    w = make_weights(preset, torch.bfloat16, torch.device("cuda"))
    hidden, topk = make_tokens(preset, 16, torch.bfloat16, torch.device("cuda"))
    ref = reference.fused_experts(hidden.float(), w.w13, w.w2, topk.ids, topk.weights)
    call = lambda: torch_grouped_mm(hidden, w.w13, w.w2, topk.ids, topk.weights)
    assert rel_err(call(), ref, None) < 1e-2
    _, err = CudaTimer(rep_ms=5).graph(call, lambda out: rel_err(out, ref, None))
    assert err < 1e-2


# ---------------------------------------------------------------------------------- probe


def test_grouped_mm_probe_child_runs_on_cpu():
    # The child script is the same one a CUDA run executes; on the CPU build it must pass
    # where torch._grouped_mm has a CPU kernel, and otherwise report a reason, not raise.
    from moekit.bench.probe import probe_grouped_mm

    reason = probe_grouped_mm("bf16", device="cpu", timeout_s=120)
    assert reason is None or reason.startswith("grouped_mm probe failed")


def test_screen_drops_impls_whose_probe_fails():
    from moekit.bench.table import Impl, screen

    ok = Impl("a", torch_loop, probe=lambda dtype: None)
    bad = Impl("b", torch_loop, probe=lambda dtype: f"no {dtype} kernel")
    plain = Impl("c", torch_loop)
    kept, notes = screen([ok, bad, plain], "bf16")
    assert [i.name for i in kept] == ["a", "c"]
    assert notes == ["b left out: no bf16 kernel"]


def test_plan_counts_graph_rows_only_where_planned():
    config = TableConfig(presets=(PRESETS["olmoe-1b-7b"],), tokens=(1, 512, 1024))
    impls = implementations(True)  # moekit and grouped_mm capturable, torch_loop not
    assert config.planned(impls, torch.device("cuda")) == 3 * 3 + 2 * 2
    assert config.planned(impls, CPU) == 3 * 3
    no_graph = TableConfig(presets=config.presets, tokens=config.tokens, graph=False)
    assert no_graph.planned(impls, torch.device("cuda")) == 9


def _fake_row(preset, m, impl, graph, time_us, ok=True):
    return {"preset": preset, "M": m, "impl": impl, "graph": graph, "time_us": time_us,
            "roofline_pct": None if time_us is None else 50.0, "rel_err": 1e-3,
            "rel_err_ok": ok, "note": None if time_us else "failed: boom"}


def test_markdown_graph_eager_and_speedups():
    rows = [
        _fake_row("p", 1, "moekit", False, 40.0), _fake_row("p", 1, "moekit", True, 20.0),
        _fake_row("p", 1, "torch_grouped_mm", False, 120.0),
        _fake_row("p", 1, "torch_grouped_mm", True, 60.0),
        _fake_row("p", 1, "torch_loop", False, 400.0),
        _fake_row("p", 4096, "moekit", False, 1000.0, ok=False),
        _fake_row("p", 4096, "torch_grouped_mm", False, None),
        _fake_row("p", 4096, "torch_loop", False, 3000.0),
    ]
    doc = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6",
           "date": "2026-11-24T10:00:00+00:00", "command": "moekit bench",
           "ceilings": Ceilings(3000.0, 3080.0, 700.0, fp8_TFLOPs=1280.0).to_json(),
           "rows": rows}
    md = render_markdown(doc)
    assert "## moekit, CUDA-graph replay" in md and "## moekit, eager" in md
    assert "| p | 20.0 (50%) |\n" in md  # graph table: only M with graph rows
    assert "| p | 40.0 (50%) | 1,000 (50%) ⚠ |" in md  # over-tolerance flag
    assert "| p | 60.0 (3.00×) | failed |" in md  # grouped_mm: graph vs graph
    assert "| p | 400ᵉ (10.00×) | 3,000ᵉ (3.00×) |" in md  # torch_loop: eager vs eager
    assert "failed: boom" in md and "memory 3,080 GB/s" in md


def test_results_name_the_commit_given_in_the_environment(monkeypatch):
    # A copied working tree (a lent GPU machine) may carry a stale .git: the caller's
    # commit wins.
    from moekit.bench.command import _git_commit

    monkeypatch.setenv("MOEKIT_GIT_COMMIT", "f04c259")
    assert _git_commit() == "f04c259"


def test_a_slow_first_call_does_not_make_a_fast_cell_slow(monkeypatch):
    """CudaTimer's cell cap looks twice: a replay's recording (one-off seconds) is followed
    by fast calls, which get do_bench's full schedule; a cell slow twice gets three calls."""
    import moekit.bench.timing as timing

    timer = timing.CudaTimer.__new__(timing.CudaTimer)
    timer.flush, timer.warmup_ms, timer.rep_ms = None, 10, 100
    timer.cell_cap_ms, timer.back_to_back_ms = 4000, 0
    calls = iter([3700.0, 0.18])
    monkeypatch.setattr(timing.CudaTimer, "_one_call_ms", staticmethod(lambda fn: next(calls)))
    monkeypatch.setattr(timing, "flushed_samples_ms", lambda *args: [0.17, 0.18, 0.19])
    fast = timer.eager(lambda: None)
    assert fast.note is None and fast.median_us == pytest.approx(180)
    calls = iter([3700.0, 3600.0, 3650.0, 3500.0])
    slow = timer.eager(lambda: None)
    assert slow.note.startswith("slow cell") and slow.median_us == pytest.approx(3.6e6)
