"""The launch of the fp8 row quantiser, shared by the plan and direct fp8 paths — alone, or
beside the dispatch plan's place kernel in one launch."""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekit._experts_fp8_kernels import _quantize_rows_kernel
from moekit._intmath import cdiv, next_power_of_2
from moekit._launch import launcher
from moekit._plan_quantize_kernels import _plan_quantize_kernel
from moekit.dispatch import PlaceLaunch
from moekit.quant import AMAX_FLOOR

FMAX = 448.0  # e4m3fn's largest finite magnitude
_QUANT_BLOCK_K = 1024
# Rows per step of the few-rows per-tensor amax ("tensor_rows": every quantiser program
# reads all rows): 8 from 3 rows on, one below. On an H100 (kernel µs, eager, back to back;
# `h100-sxm-20261207-quantiser-rows-amax-s71.json`) two [8, 1024] steps for sixteen
# [1, 1024] ones took qwen3 M = 8's plan + quantise launch from 6.0 to 5.0 µs, granite's
# from 6.6 to 5.6, gpt-oss M = 4's from 7.0 to 5.7 (4-row steps: 5.7, 6.3 and 6.2, and
# nothing at M = 4); at M = 1 any tile wider than the row cost 0.2–0.3 µs, and M = 2 lost
# 0–2% of the layer at 4 or 8 rows. This rule against one row everywhere: the layer
# 1.005–1.024× at M = 4–8, 0.998–1.006× at M = 1–2
# (`h100-sxm-20261207-ab-fp8_tensor-rows-amax2-s71.md`).
_AMAX_ROWS, _AMAX_ONE_ROW_MAX = 8, 2
# Past _AMAX_ONE_ROW_MAX rows, when every row fits one [next_pow2(M), next_pow2(K)] tile of
# at most this many values, the amax takes that one load (`_whole_amax`) instead of the
# steps: one DRAM round trip before the quantise, not one per step. On an H100 the launch
# went from 3.4–3.5 to 2.3 µs at qwen3 M = 3–4 and 4.8–4.9 to 3.3 at qwen3 / olmoe M = 8
# (granite M = 8 5.7 → 5.0; `logs/h100-sxm-20261207-quantiser-whole-amax-s72.txt`; no
# spills), the layer 1.006–1.017× at M = 4–8 on qwen3, granite and olmoe
# (`h100-sxm-20261207-ab-fp8_tensor-whole-amax-s72.md`).
_WHOLE_AMAX_MAX = 16384


class QuantizeLaunch(NamedTuple):
    """`_quantize_rows_kernel`'s launch: grid (rows, chunks), arguments and constexprs."""

    grid: tuple[int, int]
    args: tuple
    constexprs: dict


def quantize_rows_launch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                         stride_sm: int, mode: str, group: int,
                         partials: torch.Tensor | None = None,
                         pair_slots: torch.Tensor | None = None,
                         clear: torch.Tensor | None = None,
                         stride_sk: int = 1) -> QuantizeLaunch:
    """`_quantize_rows_kernel` over x [M, K] into q, writing (or, "static", reading) `scale`,
    as a launch to make (`launch_quantize_rows`, `launch_plan_and_quantize`).

    Static and 1×g group rows are spread over programs 1024 values (or one group) at a
    time; the other modes need the whole row (or tensor) per program. `partials` are
    `_amax_partials_kernel`'s, for "tensor". With `pair_slots` (a plan's, [M·k]) row m
    and its per-row scales go to the plan slots of pairs m·k … m·k + k − 1 instead: q
    [capacity, K] in plan order (padding slots left unwritten). `clear` (int32) is zeroed
    on the way, for a kernel launched later. `stride_sk` steps between a row's 1×g group
    scales: 1, or the rows' count where they are written transposed ([groups, rows]: each K
    step's scales of consecutive slots side by side, one TMA box for the Gluon GEMM1).
    """
    rows, cols = x.shape
    block_k = max(_QUANT_BLOCK_K, group)
    amax_rows = 1
    whole = False
    if mode == "tensor_rows" and rows > _AMAX_ONE_ROW_MAX:
        amax_rows = _AMAX_ROWS
        whole = next_power_of_2(rows) * next_power_of_2(cols) <= _WHOLE_AMAX_MAX
        if whole:
            amax_rows, block_k = next_power_of_2(rows), next_power_of_2(cols)
    chunk = block_k if mode in ("static", "group") else cdiv(cols, block_k) * block_k
    num_partials = 0 if partials is None else partials.numel()
    return QuantizeLaunch(
        (rows, cdiv(cols, chunk)),
        (x, q, scale, scale if partials is None else partials, num_partials, rows, cols, chunk,
         x.stride(0), q.stride(0), stride_sm, stride_sk,
         q if pair_slots is None else pair_slots,
         1 if pair_slots is None else pair_slots.numel() // max(rows, 1),
         scale if clear is None else clear, 0 if clear is None else clear.numel()),
        dict(MODE=mode, SCATTER=pair_slots is not None, CLEAR=clear is not None, GROUP=group,
             FMAX=FMAX, AMAX_FLOOR=AMAX_FLOOR, BLOCK_K=block_k,
             BLOCK_P=max(16, next_power_of_2(max(num_partials, 1))),
             AMAX_ROWS=amax_rows, AMAX_WHOLE=whole),
    )


def launch_quantize_rows(*args, **kwargs) -> None:
    """Launch `quantize_rows_launch(*args, **kwargs)`."""
    launch_plan_and_quantize(None, quantize_rows_launch(*args, **kwargs))


def launch_plan_and_quantize(place: PlaceLaunch | None, quantize: QuantizeLaunch) -> None:
    """The row quantiser, and with `place` the dispatch plan's place kernel in the same
    launch (`_plan_quantize_kernel`): neither reads what the other writes, and GEMM1 needs
    both, so the two small launches before it become one. A quantiser that scatters to
    plan slots reads the plan, so it cannot share the plan's launch."""
    if place is None:
        launcher(_quantize_rows_kernel)[quantize.grid](*quantize.args, **quantize.constexprs)
        return
    if quantize.constexprs["SCATTER"]:
        raise ValueError("quantize: a scattering quantiser reads the plan; launch it after")
    rows, chunks = quantize.grid
    launcher(_plan_quantize_kernel)[(place.programs + rows * chunks,)](
        *place.args, *quantize.args, place.programs, chunks, **place.constexprs,
        **quantize.constexprs)
