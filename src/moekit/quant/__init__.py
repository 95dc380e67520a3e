"""Weight and activation quantisation formats: descriptors, quantise, dequantise.

    QuantSpec       one operand's format: element dtype, scale group, dynamic or static scale
    QuantScheme     a layer's pair of specs (weights, GEMM inputs); presets fp8_tensor,
                    fp8_channel, fp8_block
    quantize / dequantize          the numerics, for any group shape, vectorised
    quantize_activation            a GEMM input [M, K]
    QuantizedWeight / quantize_weight   expert weights [E, N, K] with their scales

The scale is the dequantisation multiplier (x ≈ q · scale); `moekit.quant.scheme`
documents the layouts. The experts computation on these operands has its reference in
`moekit.reference.fused_experts_quantized`.
"""

from moekit.quant.fp8 import dequantize, quantize, quantize_activation
from moekit.quant.scheme import AMAX_FLOOR, FP8_DTYPES, QuantScheme, QuantSpec
from moekit.quant.weight import QuantizedWeight, quantize_weight

__all__ = [
    "AMAX_FLOOR",
    "FP8_DTYPES",
    "QuantScheme",
    "QuantSpec",
    "QuantizedWeight",
    "dequantize",
    "quantize",
    "quantize_activation",
    "quantize_weight",
]
