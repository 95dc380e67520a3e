"""How the fp8 kernels address scales, shared by the plan and direct fp8 launchers."""

from __future__ import annotations

import torch

from moekit.quant.scheme import FULL


def weight_scale_layout(scale: torch.Tensor, group_n: int, group_k: int):
    """(stride_e, stride_n, stride_k, GROUP_N, GROUP_K) of a weight scale laid out by
    `QuantSpec.scale_shape`: strides 0 (and groups 1) on axes the group spans."""
    axes = iter(range(1, scale.dim()))
    stride_n = scale.stride(next(axes)) if group_n != FULL else 0
    stride_k = scale.stride(next(axes)) if group_k != FULL else 0
    return (scale.stride(0), stride_n, stride_k,
            group_n if group_n != FULL else 1, group_k if group_k != FULL else 1)


def uniform_along_n(layout, block_n: int, row_offset: int) -> bool:
    """Whether one weight scale covers every column tile's columns (along N), so a tile
    reads it as a scalar: a group spanning N, or whole tiles inside each group. GEMM1's up
    tile starts `row_offset` = I rows further, so I must keep to the groups as well."""
    stride_n, group_n = layout[1], layout[3]
    return stride_n == 0 or (group_n % block_n == 0 and row_offset % group_n == 0)


def activation_mode(group_m: int, group_k: int, static_scale: torch.Tensor | None) -> str:
    """The quantisers' MODE for hidden: "static", "tensor", "token" or "group"."""
    if static_scale is not None:
        return "static"
    if group_m == FULL:
        return "tensor"
    return "token" if group_k == FULL else "group"
