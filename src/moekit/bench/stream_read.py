"""A read-only streaming kernel, for the memory-bandwidth ceiling.

PERF.md's read ceiling is a truly load-bound pass over ≥ 4 GB. `torch.sum` is one, but
not the fastest reader: on the H200 the deepseek-v3 layer measured 1–3% *above* a floor
computed from it at M ≥ 8 (bench/NOTES.md), so the ceiling was low. This kernel issues
every program's loads (16-byte vectors, UNROLL pieces of BLOCK elements) before it adds
them, the shape a weight-streaming GEMM has; `ceilings` takes the faster of the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048
UNROLL = 8


@triton.jit
def _stream_read_kernel(x_ptr, partial_ptr, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """Program p: the float32 sum of x[p·BLOCK·UNROLL, (p + 1)·BLOCK·UNROLL) → partial[p]."""
    base = tl.program_id(0).to(tl.int64) * (BLOCK * UNROLL)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for u in tl.static_range(UNROLL):
        acc += tl.load(x_ptr + base + u * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(acc))


def stream_read(x: torch.Tensor, partials: torch.Tensor | None = None, *, block: int = BLOCK,
                unroll: int = UNROLL, num_warps: int = 8) -> torch.Tensor:
    """Per-program float32 sums of the contiguous 1-D `x` (numel a multiple of
    block × unroll): every byte of `x` read once. `partials` may be passed to reuse it;
    `block`, `unroll` and `num_warps` shape the programs (a study's variants)."""
    chunk = block * unroll
    if x.dim() != 1 or not x.is_contiguous() or x.numel() % chunk:
        raise ValueError(f"stream_read: expected a contiguous 1-D tensor of a multiple of "
                         f"{chunk} elements, got shape {tuple(x.shape)}")
    programs = x.numel() // chunk
    if partials is None:
        partials = torch.empty(programs, dtype=torch.float32, device=x.device)
    _stream_read_kernel[(programs,)](x, partials, BLOCK=block, UNROLL=unroll,
                                     num_warps=num_warps)
    return partials
