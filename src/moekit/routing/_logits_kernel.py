"""Triton body of `router_logits`: logits [M, E] = hidden [M, H] · router weight [E, H]ᵀ.

The router GEMM of a MoE layer is tiny (E ≤ a few hundred columns) and, at decode, a
launch's host and ramp time more than its work. One program computes a [BLOCK_M, BLOCK_E]
tile of logits over the whole of H with fp32 accumulation and rounds once to the
output's dtype, as `nn.Linear` does; programs split E so the weight stream is spread
over BLOCK_E-row slices (at M = 1, E = 128: 8 programs of 16 experts each).
"""

import triton
import triton.language as tl


# M is not specialised (Triton would compile M == 1 apart): one binary serves every batch.
@triton.jit(do_not_specialize=["M"])
def _router_logits_kernel(
    hidden_ptr,  # [M, H], rows at stride_hm, unit column stride
    weight_ptr,  # [E, H], rows at stride_we, unit column stride
    out_ptr,  # [M, E] contiguous
    M,
    E,
    H,
    stride_hm,
    stride_we,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), else None
):
    """Grid: (cdiv(M, BLOCK_M), cdiv(E, BLOCK_E))."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < M
    expert_ok = experts < E
    h_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
    w_ptrs = weight_ptr + experts.to(tl.int64)[:, None] * stride_we + cols[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        col_ok = cols < H - k
        x = tl.load(h_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=expert_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    out = out_ptr + rows.to(tl.int64)[:, None] * E + experts[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & expert_ok[None, :])
