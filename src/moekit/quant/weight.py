"""Quantised expert weights: fp8 values, their scales, and the spec that reads them.

`QuantizedWeight` is how quantised weights enter moekit, whether quantised here
(`quantize_weight`, once, when weights load) or taken from a checkpoint that stores fp8
values beside their scales (DeepSeek-V3's `weight_scale_inv` [E, ceil(N/128),
ceil(K/128)], per-tensor `weight_scale` [E], per-channel [E, N]). The constructor checks
the layout once, so the experts computation can trust it.

It also carries the static scale of the GEMM's *input* when the checkpoint calibrated one
(`input_scale`): GEMM1 and GEMM2 each have their own, and each belongs with its weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit._checks import check_shape, check_tensor
from moekit.quant.fp8 import dequantize, quantize
from moekit.quant.scheme import QuantSpec, _check_static_scale


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Quantised weights of E experts, [E, N, K] (N output rows, K the reduction).

    Attributes:
        q: [E, N, K] in `spec.dtype`.
        scale: float32 of shape `spec.scale_shape(q.shape)` — [E] per tensor, [E, N] per
            channel, [E, ceil(N/bn), ceil(K/bk)] per bn×bk block; x ≈ q · scale.
        spec: a dynamic `QuantSpec` (the weight's format; its scales are `scale`).
        input_scale: optional static float32 scale ([] or [1]) of this GEMM's input, used
            when the scheme's activations are static (a checkpoint's `input_scale`;
            reduce per-expert input scales with max when loading).
    """

    q: torch.Tensor
    scale: torch.Tensor
    spec: QuantSpec
    input_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.spec, QuantSpec):
            raise TypeError(f"spec: expected a QuantSpec, got {type(self.spec).__name__}")
        if not self.spec.dynamic:
            raise ValueError("spec: expected a weight format (dynamic; the scales are `scale`)")
        check_tensor("q", self.q, ndim=3, dtypes=(self.spec.dtype,))
        check_tensor("scale", self.scale, dtypes=(torch.float32,), device=self.q.device)
        check_shape(
            "scale", self.scale, self.spec.scale_shape(self.q.shape),
            f"group {self.spec.group} of q [E, N, K] = {tuple(self.q.shape)}",
        )
        if self.input_scale is not None:
            _check_static_scale("input_scale", self.input_scale)
            if self.input_scale.device != self.q.device:
                raise ValueError(
                    f"input_scale: expected a tensor on {self.q.device}, "
                    f"got one on {self.input_scale.device}"
                )

    @property
    def shape(self) -> torch.Size:
        """[E, N, K] of the unquantised weight."""
        return self.q.shape

    def dequantize(self, dtype: torch.dtype = torch.float32, *, expert: int | None = None
                   ) -> torch.Tensor:
        """q · scale as [E, N, K] in `dtype`, or one expert's [N, K] when `expert` is given."""
        if expert is None:
            return dequantize(self.q, self.scale, self.spec, dtype)
        # A one-expert slice keeps the leading dim, so the scale layout stays valid.
        return dequantize(
            self.q[expert : expert + 1], self.scale[expert : expert + 1], self.spec, dtype
        )[0]


def quantize_weight(
    w: torch.Tensor, spec: QuantSpec, *, input_scale: torch.Tensor | None = None
) -> QuantizedWeight:
    """Quantise expert weights once, when they load.

    Args:
        w: [E, N, K] bf16/fp16/fp32 (`w13` [E, 2I, H] or `w2` [E, H, I]).
        spec: a dynamic weight spec ("tensor", "channel" or a (bn, bk) block).
        input_scale: optional static scale of the GEMM's input (see `QuantizedWeight`).
    Returns:
        the `QuantizedWeight`.
    """
    check_tensor("w", w, ndim=3)
    if not spec.dynamic:
        raise ValueError("spec: expected a weight format (dynamic); weight scales come from w")
    q, scale = quantize(w, spec)
    return QuantizedWeight(q, scale, spec, input_scale)


def check_quantized_weights(w13: object, w2: object, weight_spec: QuantSpec,
                            device: torch.device) -> None:
    """Raise unless w13 and w2 are `QuantizedWeight`s in `weight_spec`'s format on `device`."""
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, QuantizedWeight):
            raise TypeError(
                f"{name}: expected a QuantizedWeight (see moekit.quant.quantize_weight), "
                f"got {type(w).__name__}"
            )
        if w.spec != weight_spec:
            raise ValueError(
                f"{name}: quantised with group {w.spec.group}, but the scheme's weights use "
                f"group {weight_spec.group}"
            )
        if w.q.device != device:
            raise ValueError(f"{name}: expected a tensor on {device}, got one on {w.q.device}")
