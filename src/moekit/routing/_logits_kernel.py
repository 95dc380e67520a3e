"""Triton body of `router_logits` at decode: logits [M, E] = hidden [M, H] · weight [E, H]ᵀ
for up to ROWS tokens, without the matrix-multiply instruction.

At decode the router GEMM is a GEMV: a dot tile would be mostly padding and a launch's
ramp costs more than its work. Each program reads BLOCK_E rows of the router weight once,
as few steps of BLOCK_H columns as H allows (each step is a dependent round trip to
memory, ~1.2 µs on an H200: bench/NOTES.md, session 33), multiplies and sums in fp32 on
the CUDA cores for all M ≤ ROWS tokens and rounds once, as `nn.Linear` does.
"""

import triton
import triton.language as tl


# M is not specialised: one binary serves every M up to ROWS (4, 8 or 16).
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
    """Grid: (cdiv(E, BLOCK_E),)."""
    _gemv_experts(hidden_ptr, weight_ptr, out_ptr, M, E, H, stride_hm, stride_we, ROWS,
                  BLOCK_E, BLOCK_H)


@triton.jit
def _gemv_experts(hidden_ptr, weight_ptr, out_ptr, M, E, H, stride_hm, stride_we,
                  ROWS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's BLOCK_E experts' logits for all M ≤ ROWS tokens, stored into `out`."""
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
