"""fp8 cells of the kernel table: quantised weights, their bytes, their two references.

`moekit bench --dtype fp8_tensor|fp8_channel|fp8_block` draws the preset's weights in
bf16 as for a bf16 table, quantises them once per preset with the scheme of that name,
and times `moekit.fused_experts_fp8` on bf16 tokens. Each cell reports two errors:

    rel_err       against `moekit.reference.fused_experts_quantized` on the same fp8
                  weights — the kernels' error, held to DESIGN.md's 1e-2;
    rel_err_bf16  against `moekit.reference.fused_experts` on the bf16 weights — the
                  format's own error (weights and activations quantised), for the record.

The roofline's weight bytes are the fp8 values plus their float32 scales; the matmul
peak is the run's fp8 figure (torch._scaled_mm). The plain-PyTorch baselines have no
fp8 path and are left out of fp8 tables.
"""

from __future__ import annotations

import torch

from moekit.bench.inputs import ExpertWeights
from moekit.bench.presets import Preset
from moekit.quant import QuantizedWeight, QuantScheme, QuantSpec, quantize_weight
from moekit.quant.scheme import PRESET_NAMES
from moekit.reference import fused_experts_quantized
from moekit.topk import TopK

FP8_DTYPES = PRESET_NAMES
SCALE_BYTES = 4  # float32
_QUANTIZE_CHUNK = 16  # experts quantised at a time: float32 temporaries stay small


def is_fp8(dtype: str) -> bool:
    """True for the table's fp8 weight formats."""
    return dtype in FP8_DTYPES


def quantize_experts(weights: ExpertWeights, dtype: str) -> ExpertWeights:
    """The weights in the fp8 format `dtype`; biases stay as they are.

    Experts are quantised a few at a time, so deepseek-v3 (7.5 G elements in w13) never
    needs a float32 copy of a whole weight.
    """
    spec = QuantScheme.parse(dtype).weight
    return ExpertWeights(_quantize_by_chunks(weights.w13, spec),
                         _quantize_by_chunks(weights.w2, spec), weights.b13, weights.b2)


def _quantize_by_chunks(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    parts = [quantize_weight(w[e : e + _QUANTIZE_CHUNK], spec)
             for e in range(0, w.shape[0], _QUANTIZE_CHUNK)]
    return QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                           spec)


def weight_bytes_per_element(preset: Preset, dtype: str) -> float:
    """Bytes of one expert's w13 and w2 (fp8 values + float32 scales) per weight element.

    The roofline takes bytes per element; scales add 4 bytes per group, exactly counted
    here for both matrices of one expert and spread over its elements.
    """
    spec = QuantScheme.parse(dtype).weight
    shapes = ((preset.gemm1_rows, preset.hidden), (preset.hidden, preset.inter))
    elements = sum(n * k for n, k in shapes)
    scales = sum(_numel(spec.scale_shape((1, n, k))) for n, k in shapes)
    return (elements + SCALE_BYTES * scales) / elements


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def quantised_reference(hidden: torch.Tensor, qweights: ExpertWeights, topk: TopK, dtype: str,
                        activation: str, rows: torch.Tensor | None) -> torch.Tensor:
    """`fused_experts_quantized` in float32 on `rows` of the batch (all when None).

    A dynamic per-tensor scale depends on every row of hidden, so the reference sees the
    whole batch and the rows outside the sample are routed nowhere (ids −1): they cost
    nothing and leave the sample's scales as the kernels compute them.

    Returns:
        float32 [len(rows) or M, H].
    """
    ids = topk.ids
    if rows is not None:
        rows = rows.to(hidden.device)
        ids = torch.full_like(ids, -1)
        ids[rows] = topk.ids[rows]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = fused_experts_quantized(
            hidden.float(), qweights.w13, qweights.w2, ids, topk.weights, scheme=dtype,
            activation=activation, b13=qweights.b13, b2=qweights.b2,
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out if rows is None else out[rows]


def moekit_fp8(dtype: str):
    """A fused_experts-compatible callable running `fused_experts_fp8` in format `dtype`."""
    import moekit

    scheme = QuantScheme.parse(dtype)

    def fused_experts_fp8(hidden, w13, w2, topk_ids, topk_weights, *, activation, b13, b2):
        return moekit.fused_experts_fp8(hidden, w13, w2, topk_ids, topk_weights, scheme=scheme,
                                        activation=activation, b13=b13, b2=b2)

    return fused_experts_fp8
