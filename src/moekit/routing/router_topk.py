"""Host side of `router_topk`: the router GEMV and `route` as one launch at decode.

`MoE.forward` takes it up to `GEMV_ROWS` tokens (`moekit.routing.logits`): one launch
fewer per layer than `router_logits` then `route`, with the same logits (the same GEMV,
rounded to hidden's dtype) and the same routing code (`_kernels._route_rows`), where
`one_launch_serves`: the GEMV serves and gives each program one expert. On an H200, up
to 16 tokens, the one launch saved 0.7–3.7 µs on granite's router and 0.1–1.5 on qwen3's,
was within ±0.4 µs on olmoe's and mixtral's, and lost 0.5–1.2 µs on deepseek-v3's (two
experts a program, H = 7168; session 34). The launch needs a persistent int32 counter,
zero between calls (the kernel's last program resets it): `MoE` holds one per layer, so
two launches that could overlap on different streams must not share one. The launcher is
a `torch.library` custom op (`moekit::router_topk`, the counter mutated) with a fake
implementation for `torch.compile`.
"""

from __future__ import annotations

import torch

from moekit._checks import FLOAT_DTYPES, check_tensor
from moekit._intmath import cdiv
from moekit._launch import launcher
from moekit.backend import resolve_backend
from moekit.reference import routing as reference_routing
from moekit.routing._router_topk_kernel import _router_topk_kernel
from moekit.routing.logits import (
    gemv_launch_shape,
    gemv_rows,
    gemv_serves,
    gemv_shape,
    router_logits,
)
from moekit.routing.method import MAX_EXPERTS, Routing
from moekit.routing.ops import route, route_constexprs
from moekit.topk import TopK


def one_launch_serves(num_tokens: int, hidden_size: int) -> bool:
    """Whether `router_topk` runs as one launch for `num_tokens` tokens of width
    `hidden_size` (`router_logits` then `route` otherwise)."""
    return (gemv_serves(num_tokens, hidden_size)
            and gemv_shape(hidden_size, gemv_rows(num_tokens))[0] == 1)


def launch_router_topk(hidden: torch.Tensor, weight: torch.Tensor, routing: Routing,
                       counter: torch.Tensor, ids: torch.Tensor,
                       weights: torch.Tensor) -> None:
    """Run `_router_topk_kernel` into caller-owned `ids` (int32) and `weights` (float32)
    [M, k] contiguous, where the GEMV serves (`gemv_serves`; `router_topk` launches it
    only where `one_launch_serves`), with unit column strides."""
    num_tokens, hidden_size = hidden.shape
    rows, block_e, block_h, num_warps = gemv_launch_shape(hidden)
    if num_tokens == 0:
        return
    experts = weight.shape[0]
    top_k = ids.shape[1]
    logits = torch.empty((num_tokens, experts), dtype=hidden.dtype, device=hidden.device)
    launcher(_router_topk_kernel)[(cdiv(experts, block_e),)](
        hidden, weight, logits, counter, ids, weights, num_tokens, experts, hidden_size,
        hidden.stride(0), weight.stride(0), float(routing.routed_scaling_factor),
        ROWS=rows, BLOCK_E=block_e, BLOCK_H=block_h, num_warps=num_warps,
        **route_constexprs(routing, experts, top_k, False),
    )


def _router_topk_impl(hidden: torch.Tensor, weight: torch.Tensor, counter: torch.Tensor,
                      top_k: int, scoring: str, order: str, renormalize: bool, n_group: int,
                      topk_group: int,
                      routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    routing = Routing(scoring, order, renormalize, n_group, topk_group, routed_scaling_factor)
    m = hidden.shape[0]
    ids = torch.empty((m, top_k), dtype=torch.int32, device=hidden.device)
    weights = torch.empty((m, top_k), dtype=torch.float32, device=hidden.device)
    launch_router_topk(hidden, weight, routing, counter, ids, weights)
    return ids, weights


_router_topk_op = torch.library.custom_op(
    "moekit::router_topk", _router_topk_impl, mutates_args=("counter",))


@_router_topk_op.register_fake
def _router_topk_fake(hidden, weight, counter, top_k, *routing_fields):
    m = hidden.shape[0]
    return (hidden.new_empty((m, top_k), dtype=torch.int32),
            hidden.new_empty((m, top_k), dtype=torch.float32))


def router_topk(hidden: torch.Tensor, weight: torch.Tensor, top_k: int, counter: torch.Tensor,
                *, method: str | Routing = "softmax", renormalize: bool | None = None,
                backend: str = "auto") -> TopK:
    """`route(router_logits(hidden, weight), top_k, method=..., renormalize=...)`: one
    launch where `one_launch_serves` (up to `GEMV_ROWS` tokens), those two calls elsewhere
    (no score-correction bias).

    Args:
        hidden: [M, H] bf16/fp16/fp32.
        weight: [E, H], hidden's dtype and device (a router's `nn.Linear.weight`).
        top_k: experts per token, 1 ≤ top_k ≤ E.
        counter: int32 [1] on hidden's device, zero; zero again after the call (a
            counter per caller whose launches may overlap on different streams).
        method, renormalize: as `route`'s.
        backend: "auto", "triton" or "reference" (see `moekit.backend`).
    Returns:
        TopK(ids int32 [M, k], weights float32 [M, k]).
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    check_tensor("counter", counter, ndim=1, dtypes=(torch.int32,), device=hidden.device)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected [E, {hidden.shape[1]}] (hidden's H), "
                         f"got shape {tuple(weight.shape)}")
    if counter.numel() != 1:
        raise ValueError(f"counter: expected one element, got shape {tuple(counter.shape)}")
    routing = Routing.parse(method, renormalize=renormalize)
    _check_top_k(top_k, weight.shape[0], routing)
    if resolve_backend(backend, hidden) == "reference":
        logits = reference_routing.router_logits(hidden, weight)
        return reference_routing.route(logits, top_k, method=routing)
    if not one_launch_serves(*hidden.shape):
        return route(router_logits(hidden, weight, backend=backend), top_k, method=routing,
                     backend=backend)
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    op = _router_topk_op if torch.compiler.is_compiling() else _router_topk_impl
    return TopK(*op(hidden, weight, counter, top_k, routing.scoring, routing.order,
                    routing.renormalize, routing.n_group, routing.topk_group,
                    float(routing.routed_scaling_factor)))


def _check_top_k(top_k: object, num_experts: int, routing: Routing) -> None:
    """`route`'s checks of k and E (as `check_route_args`, without a logits tensor)."""
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"weight: expected 1 to {MAX_EXPERTS} experts (rows), "
                         f"got E = {num_experts}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k: expected an int, got {type(top_k).__name__}")
    if num_experts % routing.n_group:
        raise ValueError(f"n_group: {routing.n_group} does not divide E = {num_experts}")
    kept = routing.topk_group * (num_experts // routing.n_group)
    if not 1 <= top_k <= kept:
        raise ValueError(f"top_k: expected 1 <= top_k <= {kept} (the experts the groups "
                         f"keep), got {top_k}")
