"""Triton body of `router_logits`: logits [M, E] = hidden [M, H] · router weight [E, H]ᵀ.

The router GEMM of a MoE layer is tiny (E ≤ a few hundred columns) and, at decode, a
launch's host and ramp time more than its work. One program computes a [BLOCK_M, BLOCK_E]
tile of logits over the whole of H with fp32 accumulation and rounds once to the
output's dtype, as `nn.Linear` does; programs split E so the weight stream is spread
over BLOCK_E-row slices. For up to 4 tokens `_router_gemv_kernel` instead: no dot, two
experts a program (64 programs at E = 128).
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


# M is not specialised: one binary serves 1 to ROWS tokens.
@triton.jit(do_not_specialize=["M"])
def _router_gemv_kernel(
    hidden_ptr,  # [M, H], rows at stride_hm, unit column stride
    weight_ptr,  # [E, H], rows at stride_we, unit column stride
    out_ptr,  # [M, E] contiguous
    M,
    E,
    H,
    stride_hm,
    stride_we,
    ROWS: tl.constexpr,  # ≥ M
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid: (cdiv(E, BLOCK_E),). At decode a dot tile would be mostly padding and leave
    most SMs idle (8 programs for E = 128 at 16 experts each, 1.5–3 µs behind cuBLAS's
    GEMV on an H200, bench/NOTES.md session 32): here each program reads BLOCK_E rows of
    the router weight (a few KB) once, products and sums in fp32 on the CUDA cores for all
    M ≤ ROWS tokens, rounded once."""
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    expert_ok = experts < E
    rows = tl.arange(0, ROWS)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_H)
    w_ptrs = weight_ptr + experts.to(tl.int64)[:, None] * stride_we + cols[None, :]
    h_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
    acc = tl.zeros([ROWS, BLOCK_E], dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        col_ok = cols < H - k
        w = tl.load(w_ptrs, mask=expert_ok[:, None] & col_ok[None, :], other=0.0)
        x = tl.load(h_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        w_ptrs += BLOCK_H
        h_ptrs += BLOCK_H
    out = out_ptr + rows.to(tl.int64)[:, None] * E + experts[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & expert_ok[None, :])
