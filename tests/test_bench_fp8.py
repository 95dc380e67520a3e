"""The fp8 cells of `moekit bench`: bytes with scales, the two references, CPU table rows."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_close, rel_l2
from moekit.bench.ceilings import Ceilings, measure_cpu
from moekit.bench.fp8 import (
    FP8_DTYPES,
    quantised_reference,
    quantize_experts,
    weight_bytes_per_element,
)
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS, Preset, cpu_preset
from moekit.bench.results import render_markdown, validate
from moekit.bench.roofline import moe_cost
from moekit.bench.table import TableConfig, implementations, run_table
from moekit.bench.timing import CpuTimer
from moekit.quant import QuantScheme, quantize_weight
from moekit.reference import fused_experts_quantized

CPU = torch.device("cpu")


def test_weight_bytes_count_scales():
    # H=256, I=128, gated: w13 [256, 256], w2 [256, 128] → 98,304 fp8 elements.
    p = Preset("toy", 4, 2, 256, 128)
    elements = 256 * 256 + 256 * 128
    # per tensor: one scale per matrix; per channel: one per row (256 + 256);
    # 128×128 blocks: w13 2×2 + w2 2×1 = 6.
    for dtype, scales in (("fp8_tensor", 2), ("fp8_channel", 512), ("fp8_block", 6)):
        assert weight_bytes_per_element(p, dtype) == pytest.approx(
            (elements + 4 * scales) / elements), dtype


def test_fp8_cost_uses_fp8_bytes_and_bf16_biases():
    p = Preset("toy", 4, 2, 256, 128)
    per = weight_bytes_per_element(p, "fp8_tensor")
    cost = moe_cost(1, 2, 256, 128, 256, experts_hit=2, weight_bytes=per, act_bytes=2,
                    bias=True, bias_bytes=2)
    expected = 2 * ((256 * 256 + 256 * 128) + 8 + (256 + 256) * 2) + 2 * 256 * 2
    assert cost.bytes == pytest.approx(expected)


def test_fp8_peak_is_the_fp8_ceiling():
    ceilings = Ceilings(copy_GBps=1.0, read_GBps=1.0, bf16_TFLOPs=700.0, fp8_TFLOPs=1300.0)
    assert all(ceilings.matmul_TFLOPs(d) == 1300.0 for d in FP8_DTYPES)
    assert ceilings.matmul_TFLOPs("bf16") == 700.0
    with pytest.raises(ValueError, match="fp8_block"):
        Ceilings(1.0, 1.0, 700.0).matmul_TFLOPs("fp8_block")


def test_quantised_reference_on_a_row_sample_keeps_per_tensor_scales():
    # Rows outside the sample are routed nowhere, not dropped: the dynamic per-tensor scale
    # of GEMM1's input still comes from the whole batch.
    preset = cpu_preset(PRESETS["olmoe-1b-7b"])
    weights = quantize_experts(make_weights(preset, torch.float32, CPU), "fp8_tensor")
    hidden, topk = make_tokens(preset, 12, torch.float32, CPU)
    hidden[3] *= 50  # the batch's amax, outside the sample
    rows = torch.tensor([0, 5, 7])
    sample = quantised_reference(hidden, weights, topk, "fp8_tensor", preset.activation, rows)
    full = fused_experts_quantized(hidden, weights.w13, weights.w2, topk.ids, topk.weights,
                                   scheme="fp8_tensor", activation=preset.activation)
    assert_close(sample, full[rows], 1e-5)  # float32 summation order only
    naive = fused_experts_quantized(hidden[rows], weights.w13, weights.w2, topk.ids[rows],
                                    topk.weights[rows], scheme="fp8_tensor",
                                    activation=preset.activation)
    assert rel_l2(naive, full[rows]) > 1e-2  # slicing the batch would change the scale


def test_quantize_experts_by_chunks_equals_whole():
    w = torch.randn(37, 64, 32)  # 37 experts: the last chunk is partial
    whole = quantize_weight(w, QuantScheme.fp8_block().weight)
    chunked = quantize_experts(make_weights(Preset("t", 37, 2, 32, 32), torch.float32, CPU),
                               "fp8_block")
    assert chunked.w13.q.shape == (37, 64, 32) and chunked.w13.scale.shape == (37, 1, 1)
    from moekit.bench.fp8 import _quantize_by_chunks

    again = _quantize_by_chunks(w, QuantScheme.fp8_block().weight)
    assert torch.equal(again.q.view(torch.uint8), whole.q.view(torch.uint8))
    assert torch.equal(again.scale, whole.scale)


def test_fp8_implementations_have_no_baselines():
    impls = implementations(True, "fp8_channel")
    assert [i.name for i in impls] == ["moekit"]


@pytest.mark.parametrize("dtype", FP8_DTYPES)
def test_cpu_fp8_table_rows(dtype):
    presets = (cpu_preset(PRESETS["granite-3.0-3b-a800m"]), cpu_preset(PRESETS["gpt-oss-120b"]))
    config = TableConfig(presets=presets, tokens=(1, 5), dtype=dtype, ref_rows=4)
    ceilings = measure_cpu(dtype)
    rows = list(run_table(config, implementations(True, dtype), CpuTimer(budget_ms=1),
                          ceilings, CPU))
    assert len(rows) == 2 * 2  # presets × tokens, moekit only
    for row in rows:
        assert row["dtype"] == dtype and row["impl"] == "moekit"
        assert row["rel_err"] < 1e-2 and row["rel_err_ok"], row  # bf16 output rounding only
        assert 0.02 < row["rel_err_bf16"] < 0.2, row  # the format's own error, really there
        assert row["bytes"] > 0 and row["floor_us"] > 0
    doc = {"device": "cpu", "torch": "x", "triton": "y", "date": "2026-01-01T00:00:00",
           "command": "moekit bench", "ceilings": ceilings.to_json(), "rows": rows}
    assert validate(doc) == []
    json.dumps(doc, allow_nan=False)
    assert "rel_err_bf16 (against the bf16 weights)" in render_markdown(doc)


def test_cli_accepts_fp8_dtypes(tmp_path):
    import argparse

    from moekit.bench.command import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--cpu", "--dtype", "fp8_tensor", "--presets", "granite-3.0-3b-a800m",
                              "--tokens", "2", "--out", str(tmp_path), "--rep-ms", "1"])
    assert run(args) == 0
    (result,) = tmp_path.glob("*.json")
    doc = json.loads(result.read_text())
    assert "kernels-fp8_tensor" in result.name
    assert doc["reference"]["impl"] == "moekit.reference.fused_experts_quantized"
    assert [r["dtype"] for r in doc["rows"]] == ["fp8_tensor"]
