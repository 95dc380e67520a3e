"""fp8 quantise / dequantise by a `QuantSpec`: the numerics every moekit path agrees on.

One vectorised formulation covers every group shape: the matrix [..., R, C] is padded
with zeros to whole groups and viewed as [..., R/gr, gr, C/gc, gc], so a group's amax is
one reduction and its scale broadcasts over the group's elements. Zero padding never
raises an amax, which is what makes partial groups at the edges exact. No loop visits
experts, rows or groups, so the same code runs on any device.

The rounding is the cast's round-to-nearest-even, after `x / scale` (a division, not a
multiplication by the reciprocal) and a clamp to ±fmax; a kernel that should match the
reference bit for bit does the same. See `moekit.quant.scheme` for the scale convention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit._checks import FLOAT_DTYPES, check_shape, check_tensor
from moekit.quant.scheme import AMAX_FLOOR, FULL, QuantSpec


def quantize(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `x` per `spec`: dynamic scales from each group's amax, or the static scale.

    Args:
        x: [..., R, C] bf16/fp16/fp32; C is the GEMM's reduction dimension.
        spec: the format; a static spec must carry its scale.
    Returns:
        q: [..., R, C] in `spec.dtype`.
        scale: float32 of shape `spec.scale_shape(x.shape)`, with x ≈ q · scale.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 2:
        raise ValueError(f"x: expected [..., rows, cols], got shape {tuple(x.shape)}")
    *batch, rows, cols = x.shape
    xg = _to_groups(x.float(), spec)  # [..., nr, gr, nc, gc]
    if spec.dynamic:
        amax = xg.abs().amax(dim=(-3, -1))  # [..., nr, nc]
        # A tensor divisor, not a Python number: CUDA divides by a scalar as a multiply
        # by its reciprocal, which is 1 ulp off at times, and a kernel's correctly
        # rounded scale must equal this one bit for bit (else whole groups round apart).
        grid_scale = amax.clamp(min=AMAX_FLOOR) / torch.full_like(amax, spec.fmax)
    elif spec.scale is None:
        raise ValueError(
            "spec: a static spec needs its scale (spec.with_scale(scale)) to quantise"
        )
    else:
        if spec.scale.device != x.device:
            raise ValueError(
                f"spec.scale: expected a tensor on {x.device}, got one on {spec.scale.device}"
            )
        grid_scale = spec.scale.reshape(1, 1).expand(*batch, 1, 1)  # [..., 1, 1]
    # Clamp before the cast: e4m3fn has no infinity, and not every cast saturates.
    qg = (xg / grid_scale[..., :, None, :, None]).clamp(-spec.fmax, spec.fmax)
    q = _from_groups(qg, rows, cols).to(spec.dtype)  # [..., R, C]
    return q, grid_scale.reshape(spec.scale_shape(x.shape)).contiguous()


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The inverse of `quantize`: q · scale, each scale broadcast over its group.

    Args:
        q: [..., R, C] in `spec.dtype`.
        scale: float32 of shape `spec.scale_shape(q.shape)`.
        spec: the format `q` was quantised with.
        dtype: the result's dtype (the product is formed in float32).
    Returns:
        [..., R, C] in `dtype`.
    """
    check_tensor("q", q, dtypes=(spec.dtype,))
    if q.dim() < 2:
        raise ValueError(f"q: expected [..., rows, cols], got shape {tuple(q.shape)}")
    check_tensor("scale", scale, dtypes=(torch.float32,), device=q.device)
    expected = spec.scale_shape(q.shape)
    check_shape("scale", scale, expected, f"the scale layout of group {spec.group}")
    *batch, rows, cols = q.shape
    nr, nc = spec.grid(rows, cols)
    grid_scale = scale.reshape(*batch, nr, nc)
    xg = _to_groups(q.float(), spec) * grid_scale[..., :, None, :, None]
    return _from_groups(xg, rows, cols).to(dtype)


def quantize_activation(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a GEMM input [M, K] (tokens, or token–expert pairs, by K).

    Args:
        x: [M, K] bf16/fp16/fp32; M may be 0.
        spec: dynamic per-tensor / per-token / 1×g, or static per-tensor with its scale.
    Returns:
        q: [M, K] fp8; scale: float32 [1] (per tensor), [M] (per token) or
        [M, ceil(K/g)] (1×g groups).
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    if spec.group[0] not in (1, FULL):
        raise ValueError(
            f"spec: an activation group must not span several tokens, got group {spec.group}"
        )
    return quantize(x, spec)


def _to_groups(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[..., R, C] → zero-padded [..., nr, gr, nc, gc] view of whole groups."""
    *batch, rows, cols = x.shape
    gr, gc = spec.group_size(rows, cols)
    nr, nc = spec.grid(rows, cols)
    x = F.pad(x, (0, nc * gc - cols, 0, nr * gr - rows))  # [..., nr*gr, nc*gc]
    return x.reshape(*batch, nr, gr, nc, gc)


def _from_groups(xg: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[..., nr, gr, nc, gc] → [..., R, C], dropping the padding."""
    *batch, nr, gr, nc, gc = xg.shape
    return xg.reshape(*batch, nr * gr, nc * gc)[..., :rows, :cols].contiguous()
