"""When the expert GEMMs take their tiles through Hopper TMA descriptors, and the descriptors.

TMA (the Tensor Memory Accelerator of sm_90+) copies whole tiles from global to shared
memory. The prefill GEMMs measured 5–14% faster with it (bench/NOTES.md, v2), so it
is used where that was measured: 16-bit and fp8 weights at the 128-row tile of the
compute-bound regime. A descriptor needs a 16-byte-aligned base and row strides; the
weights are viewed as one matrix [E·N, K], so they must be contiguous.
"""

from __future__ import annotations

import functools

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from moekit.tuning.heuristic import HOPPER_SMS

TMA_BLOCK_M = 128  # the row tile the TMA path was measured with
_TMA_DTYPES = (torch.bfloat16, torch.float16, torch.float8_e4m3fn)
_ALIGN = 16
_INTERPRETER_PROGRAMS = 4  # persistent programs when there is no GPU to size the grid


def device_has_tma(device: torch.device) -> bool:
    """sm_90 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _aligned(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.data_ptr() % _ALIGN == 0


def use_tma(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, block_m: int) -> bool:
    """Whether the experts GEMMs can and should take their weight tiles (and GEMM2 its
    `inter` tiles, of the weights' dtype) through TMA descriptors; `hidden` names the device."""
    row_bytes_ok = all(
        (n * w13.element_size()) % _ALIGN == 0 for n in (w13.shape[2], w2.shape[2])
    )
    return (
        block_m == TMA_BLOCK_M
        and w13.dtype in _TMA_DTYPES
        and w2.dtype == w13.dtype
        and row_bytes_ok
        and _aligned(w13)
        and _aligned(w2)
        and device_has_tma(hidden.device)
    )


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device) -> int:
    """Programs of a persistent grid: one per SM."""
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def heuristic_sms(device: torch.device) -> int:
    """SMs the tile heuristics plan for: this GPU's; an H100's or H200's on other devices
    and under torch.compile (which traces the heuristic as plain arithmetic)."""
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return persistent_programs(device)
    return HOPPER_SMS


def matrix_descriptor(t: torch.Tensor, block_rows: int, block_cols: int) -> TensorDescriptor:
    """A descriptor over `t` seen as a row-major matrix [numel / last dim, last dim]."""
    cols = t.shape[-1]
    rows = t.numel() // cols
    return TensorDescriptor(t, [rows, cols], [cols, 1], [block_rows, block_cols])
