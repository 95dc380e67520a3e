"""Host side of `router_logits`: checks, the output, the grid, one launch.

`MoE.forward` computes its router logits here at decode sizes, inside the replayed
`fused_moe` call (`moekit._replay`), rather than through `nn.Linear`: on an H200's host
the linear cost ~15 µs per eager call against ~5 for one more replayed launch
(bench/NOTES.md, session 30). The launcher is a `torch.library` custom op
(`moekit::router_logits`) with a fake implementation for `torch.compile`.
"""

from __future__ import annotations

import torch

from moekit._checks import FLOAT_DTYPES, check_tensor
from moekit._dot_precision import dot_precision
from moekit._intmath import cdiv
from moekit._launch import launcher
from moekit.backend import resolve_backend
from moekit.reference import routing as reference_routing
from moekit.routing._logits_kernel import _router_gemv_kernel, _router_logits_kernel


def _tiles(num_tokens: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_E, BLOCK_H, num_warps) of the dot kernel: narrow expert slices up
    to 16 tokens, so the router weight streams through many programs; square tiles once
    rows fill them."""
    if num_tokens <= 16:
        return 16, 16, 128, 4
    return 64, 64, 64, 4


# Up to this many tokens `_router_gemv_kernel` runs (products on the CUDA cores, many
# programs of GEMV_EXPERTS experts each, GEMV_H columns a step); above, the dot tiles.
GEMV_ROWS, GEMV_EXPERTS, GEMV_H = 4, 2, 1024


def launch_router_logits(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """Run `_router_gemv_kernel` (M ≤ GEMV_ROWS) or `_router_logits_kernel` into a
    caller-owned [M, E] contiguous `out`."""
    num_tokens, hidden_size = hidden.shape
    experts = weight.shape[0]
    if num_tokens == 0:
        return
    if num_tokens <= GEMV_ROWS:
        launcher(_router_gemv_kernel)[(cdiv(experts, GEMV_EXPERTS),)](
            hidden, weight, out, num_tokens, experts, hidden_size, hidden.stride(0),
            weight.stride(0), ROWS=GEMV_ROWS, BLOCK_E=GEMV_EXPERTS, BLOCK_H=GEMV_H,
            num_warps=4,
        )
        return
    block_m, block_e, block_h, num_warps = _tiles(num_tokens)
    grid = (cdiv(num_tokens, block_m), cdiv(experts, block_e))
    launcher(_router_logits_kernel)[grid](
        hidden, weight, out, num_tokens, experts, hidden_size, hidden.stride(0),
        weight.stride(0), BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_H=block_h,
        DOT_PRECISION=dot_precision(hidden), num_warps=num_warps,
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
    """`hidden @ weight.T` with fp32 accumulation, rounded once to hidden's dtype.

    Args:
        hidden: [M, H] bf16/fp16/fp32 with unit column stride.
        weight: [E, H], hidden's dtype and device, unit column stride (a router's
            `nn.Linear.weight`).
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
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    op = _router_logits_op if torch.compiler.is_compiling() else _router_logits_impl
    return op(hidden, weight)
