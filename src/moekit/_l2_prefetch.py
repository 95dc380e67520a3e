"""Hopper's bulk L2 prefetch, from Triton: start a program's whole weight stream at once.

A decode GEMM program streams its weight rows through a software pipeline only
`num_stages` tiles deep, and does nothing with the memory system before its first tile
is requested: work in its prologue (quantising its input, reading scales) delays the
stream by that work's latency. `cp.async.bulk.prefetch.L2` (sm_90) asks L2 to fetch a
contiguous range of up to 4 GB with one instruction and no register or barrier: one per
weight row starts every byte of the program's slice in flight before the prologue.
"""

import triton
import triton.language as tl


@triton.jit
def _prefetch_rows_l2(row_ptrs, row_bytes):
    """Prefetch `row_bytes` (a multiple of 16, each pointer 16-byte aligned) from every
    pointer of `row_ptrs` into L2. A hint: nothing waits on it, nothing reads its result."""
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
        "=r,l,r", [row_ptrs, tl.full(row_ptrs.shape, row_bytes, tl.int32)],
        dtype=tl.int32, is_pure=False, pack=1)
