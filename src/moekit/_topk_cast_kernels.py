"""Triton body of `moekit._topk_cast`: top-k ids to int32 and weights to float32, one pass.

    _cast_topk_kernel  grid (cdiv(M·k, BLOCK),): BLOCK (token, slot) pairs per program

Elementwise over the flattened [M, k] pairs. Ids outside int32's range become −1 ("no
expert": truncated they would alias onto real experts), the others narrow exactly; floats
round to nearest, as torch's casts do. The result is bitwise `_topk_cast.int32_ids(ids)`
and `weights.float()`.
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["pairs"])
def _cast_topk_kernel(
    ids_ptr,  # [M*k] any integer dtype
    weights_ptr,  # [M*k] any float dtype
    ids_out_ptr,  # [M*k] int32, out
    weights_out_ptr,  # [M*k] float32, out
    pairs,  # M*k
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < pairs
    ids = tl.load(ids_ptr + offs, mask=ok)
    if ids.dtype.primitive_bitwidth > 32:
        ids = tl.where((ids >= -2**31) & (ids < 2**31), ids, -1)
    tl.store(ids_out_ptr + offs, ids.to(tl.int32), mask=ok)
    weights = tl.load(weights_ptr + offs, mask=ok)
    tl.store(weights_out_ptr + offs, weights.to(tl.float32), mask=ok)
