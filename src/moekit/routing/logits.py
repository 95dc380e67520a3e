"""Host side of `router_logits`: the router GEMM, as a moekit kernel at decode sizes and
cuBLAS (`F.linear`) above.

`MoE.forward` computes its router logits here up to GEMV_ROWS tokens, inside the
replayed `fused_moe` call (`moekit._replay`), rather than through `nn.Linear`: on an
H200's host the linear cost ~15 µs per eager call against ~5 for one more replayed launch
(bench/NOTES.md, session 30), and the GEMV kernel's GPU time is below cuBLAS's there
(sessions 33 and 34). A dot-tile kernel lost to cuBLAS from 8 tokens (0.2–0.8×); the GEMV
kernel serves up to GEMV_ROWS tokens where `gemv_serves` says it beats cuBLAS, cuBLAS
elsewhere. The launcher is a `torch.library` custom op (`moekit::router_logits`) with a
fake implementation for `torch.compile`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit._checks import FLOAT_DTYPES, check_tensor
from moekit._intmath import cdiv, next_power_of_2
from moekit._launch import launcher
from moekit.backend import resolve_backend
from moekit.reference import routing as reference_routing
from moekit.routing._logits_kernel import _router_gemv_kernel

# The GEMV kernel takes at most this many tokens (`gemv_serves` has the whole rule).
GEMV_ROWS = 16
# The kernel's rows come in powers of two from this (one binary for 1 to 4 tokens).
_MIN_ROWS = 4
# The widest column step: one step covers H up to this (deepseek-v3's 7168).
_MAX_STEP = 8192
# The most products of one expert a program holds (rows × columns a step): deepseek-v3's
# 16 × 8192 lost to cuBLAS (15.1 against 10.6 µs), mixtral's 16 × 4096 and deepseek-v3's
# 8 × 8192 beat it (router_gemv_sweep.py on an H200, session 34).
_MAX_ROW_TILE = 65536


def gemv_rows(num_tokens: int) -> int:
    """The kernel's ROWS for `num_tokens` (≤ GEMV_ROWS): 4, 8 or 16."""
    return max(_MIN_ROWS, next_power_of_2(num_tokens))


def gemv_shape(hidden_size: int, rows: int = _MIN_ROWS) -> tuple[int, int, int]:
    """(experts a program, columns a step, warps) of `_router_gemv_kernel`: H in one step
    where it fits (every step is a dependent memory round trip), one expert a program up
    to 4096 columns, 4 warps up to 2048 columns and 8 rows, else 8 — the best of
    bench/scripts/router_gemv_sweep.py on an H200 at 4, 8 and 16 rows on qwen3, granite,
    mixtral and deepseek-v3's routers (sessions 33 and 34)."""
    step = min(next_power_of_2(hidden_size), _MAX_STEP)
    warps = 4 if step <= 2048 and rows <= 8 else 8
    return (1 if step <= 4096 else 2), step, warps


def gemv_serves(num_tokens: int, hidden_size: int) -> bool:
    """Whether the GEMV kernel computes the router logits of `num_tokens` tokens of width
    `hidden_size` (cuBLAS otherwise): up to GEMV_ROWS tokens while a program's tile of one
    expert stays within _MAX_ROW_TILE products."""
    if num_tokens > GEMV_ROWS:
        return False
    _, step, _ = gemv_shape(hidden_size, gemv_rows(num_tokens))
    return gemv_rows(num_tokens) * step <= _MAX_ROW_TILE


def gemv_launch_shape(hidden: torch.Tensor) -> tuple[int, int, int, int]:
    """(ROWS, experts a program, columns a step, warps) of a GEMV launch over `hidden`
    [M, H]; ValueError where `gemv_serves` says cuBLAS."""
    num_tokens, hidden_size = hidden.shape
    if not gemv_serves(num_tokens, hidden_size):
        raise ValueError(f"hidden: the GEMV kernel does not serve {num_tokens} tokens of "
                         f"width {hidden_size} (gemv_serves)")
    rows = gemv_rows(num_tokens)
    return (rows, *gemv_shape(hidden_size, rows))


def launch_router_logits(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """Run `_router_gemv_kernel` where `gemv_serves` into a caller-owned [M, E] contiguous
    `out`."""
    num_tokens, hidden_size = hidden.shape
    rows, block_e, block_h, num_warps = gemv_launch_shape(hidden)
    if num_tokens == 0:
        return
    experts = weight.shape[0]
    launcher(_router_gemv_kernel)[(cdiv(experts, block_e),)](
        hidden, weight, out, num_tokens, experts, hidden_size, hidden.stride(0),
        weight.stride(0), ROWS=rows, BLOCK_E=block_e, BLOCK_H=block_h, num_warps=num_warps,
    )


def _router_logits_impl(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = torch.empty((hidden.shape[0], weight.shape[0]), dtype=hidden.dtype,
                      device=hidden.device)
    launch_router_logits(hidden, weight, out)
    return out


_router_logits_op = torch.library.custom_op("moekit::router_logits", _router_logits_impl,
                                            mutates_args=())


@_router_logits_op.register_fake
def _router_logits_fake(hidden, weight):
    return hidden.new_empty((hidden.shape[0], weight.shape[0]))


def router_logits(hidden: torch.Tensor, weight: torch.Tensor, *,
                  backend: str = "auto") -> torch.Tensor:
    """`hidden @ weight.T` with fp32 accumulation, rounded once to hidden's dtype: the GEMV
    kernel where `gemv_serves` (up to GEMV_ROWS tokens), `F.linear` elsewhere.

    Args:
        hidden: [M, H] bf16/fp16/fp32.
        weight: [E, H], hidden's dtype and device (a router's `nn.Linear.weight`).
        backend: "auto", "triton" or "reference" (see `moekit.backend`).
    Returns:
        [M, E] in hidden's dtype.
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected [E, {hidden.shape[1]}] (hidden's H), "
                         f"got shape {tuple(weight.shape)}")
    if resolve_backend(backend, hidden) == "reference":
        return reference_routing.router_logits(hidden, weight)
    if not gemv_serves(*hidden.shape):
        return F.linear(hidden, weight)
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    op = _router_logits_op if torch.compiler.is_compiling() else _router_logits_impl
    return op(hidden, weight)
