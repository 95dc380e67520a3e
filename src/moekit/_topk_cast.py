"""The experts ops' top-k operands as their kernels read them: ids int32, weights float32.

Callers often hold other dtypes: `torch.topk` returns int64 ids, transformers hands its
experts int64 ids and (for some models) bf16 weights. Converting them with torch's `.to`
is two aten copies per call, and an eager call that runs aten ops other than allocations
cannot be replayed (`moekit._replay`), so such calls ran in full every time. On the
Triton path the conversion is instead one small launch of moekit's own
(`_cast_topk_kernel`) into fresh buffers, which a replay records like any other launch.
The direct path (decode) needs not even that: its kernels read int64 ids and 16-bit
weights themselves, comparing ids with E before they narrow them to 32 bits. Under
torch.compile, on the reference path and for non-contiguous operands, torch's casts remain
(traceable; rare).

An int64 id outside int32's range becomes −1 ("no expert") on every path: truncated to 32
bits, 2**32 + 1 would be expert 1, where the ops promise that ids outside [0, E)
contribute nothing.
"""

from __future__ import annotations

import torch

from moekit._intmath import cdiv
from moekit._launch import launcher
from moekit._topk_cast_kernels import _cast_topk_kernel

BLOCK = 1024  # pairs per program: a few programs even at prefill's M·k


def kernel_topk(topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                launch: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32, weights float32) of the same shape [M, k]: the inputs themselves when
    they already are, else converted — by one `_cast_topk_kernel` launch when `launch`
    (the op runs its Triton kernels) and the operands are contiguous, else by torch
    (`int32_ids`: int64 ids outside int32's range become −1 either way)."""
    if topk_ids.dtype == torch.int32 and topk_weights.dtype == torch.float32:
        return topk_ids, topk_weights
    if (launch and not torch.compiler.is_compiling() and topk_ids.is_contiguous()
            and topk_weights.is_contiguous() and topk_ids.numel() > 0):
        ids = torch.empty(topk_ids.shape, dtype=torch.int32, device=topk_ids.device)
        weights = torch.empty(topk_weights.shape, dtype=torch.float32,
                              device=topk_weights.device)
        pairs = topk_ids.numel()
        launcher(_cast_topk_kernel)[(cdiv(pairs, BLOCK),)](
            topk_ids, topk_weights, ids, weights, pairs, BLOCK=BLOCK)
        return ids, weights
    return int32_ids(topk_ids), topk_weights.to(torch.float32)


def int32_ids(topk_ids: torch.Tensor) -> torch.Tensor:
    """Integer ids as int32, ids outside int32's range −1: truncated to 32 bits they would
    alias onto real experts (2**32 + 1 → 1) where they must contribute nothing."""
    if topk_ids.dtype == torch.int64:
        fits = (topk_ids >= -2**31) & (topk_ids < 2**31)
        topk_ids = torch.where(fits, topk_ids, -1)
    return topk_ids.to(torch.int32)
