"""Host side of `route`: argument checks, output allocation, grid, one kernel launch.

The launchers are `torch.library.custom_op`s (namespace `moekit`) with fake
implementations, so `torch.compile` traces through them. Nothing here reads tensor
data, synchronises with the host or sizes an allocation by data, so a routing call can
be captured in a CUDA graph.
"""

import torch

from moekit._intmath import cdiv, next_power_of_2
from moekit._launch import launcher
from moekit._replay import replayed
from moekit.backend import resolve_backend
from moekit.reference import routing as reference_routing
from moekit.routing._kernels import _route_kernel
from moekit.routing.method import Routing, check_route_args
from moekit.topk import TopK, pack_topk

# Elements of one program's [BLOCK_M, E] register tile: several rows per program at small
# E so every thread holds work, one row from E = 2048 on (the row alone fills the tile).
_TILE_ELEMENTS = 2048


def _launch_config(num_experts: int, n_group: int) -> dict[str, int]:
    """Rows per program and warps from (E, n_group) only (the routing constants:
    `route_constexprs`).

    BLOCK_M does not depend on M, so decode and prefill batches share one compiled kernel.
    """
    block_g = next_power_of_2(n_group)
    block_s = next_power_of_2(num_experts // n_group)
    row = block_g * block_s
    block_m = max(1, min(16, _TILE_ELEMENTS // row))
    return {
        "BLOCK_M": block_m,
        "num_warps": min(16, max(4, block_m * row // 256)),
    }


def route_constexprs(routing: Routing, num_experts: int, top_k: int,
                     has_bias: bool) -> dict[str, object]:
    """`_route_rows`' routing constants for E experts and k of them (`_route_kernel` and
    `moekit.routing._router_topk_kernel` both take them)."""
    return {
        "SOFTMAX": routing.scoring == "softmax",
        "SOFTMAX_OVER_TOPK": routing.softmax_over_topk,
        "SELECT_ON_LOGITS": routing.selects_on_logits(has_bias),
        "RENORMALIZE": routing.renormalize,
        "TOP_K": top_k,
        "N_GROUP": routing.n_group,
        "TOPK_GROUP": routing.topk_group,
        "GROUP_SIZE": num_experts // routing.n_group,
        "BLOCK_G": next_power_of_2(routing.n_group),
        "BLOCK_S": next_power_of_2(num_experts // routing.n_group),
        "BLOCK_K": next_power_of_2(top_k),
    }


def launch_route(
    router_logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    routing: Routing,
    *,
    ids: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
) -> None:
    """Run `_route_kernel` into caller-owned outputs (tests pass poisoned buffers).

    Args:
        router_logits: [M, E] bf16/fp16/fp32; bias: optional [E].
        ids, weights: int32 / float32 [M, k] contiguous, written when `packed` is None.
        packed: int32 [M, k] contiguous; when given, only it is written.
    """
    num_tokens, num_experts = router_logits.shape
    if num_tokens == 0:
        return
    cfg = _launch_config(num_experts, routing.n_group)
    block_m, num_warps = cfg["BLOCK_M"], cfg["num_warps"]
    out = packed if packed is not None else ids
    grid = (cdiv(num_tokens, block_m),)
    launcher(_route_kernel)[grid](
        router_logits,
        bias if bias is not None else router_logits,  # placeholder pointer, never read
        out,
        weights if packed is None else out,  # placeholder pointer, never written
        out,
        num_tokens,
        router_logits.stride(0),
        router_logits.stride(1),
        bias.stride(0) if bias is not None else 0,
        float(routing.routed_scaling_factor),
        HAS_BIAS=bias is not None,
        PACKED=packed is not None,
        BLOCK_M=block_m,
        num_warps=num_warps,
        **route_constexprs(routing, num_experts, top_k, bias is not None),
    )


def _routing(scoring, order, renormalize, n_group, topk_group, routed_scaling_factor) -> Routing:
    return Routing(scoring, order, renormalize, n_group, topk_group, routed_scaling_factor)


def _route_impl(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    scoring: str,
    order: str,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate ids [M, k] int32 and weights [M, k] fp32 and launch the routing kernel."""
    routing = _routing(scoring, order, renormalize, n_group, topk_group, routed_scaling_factor)
    m = router_logits.shape[0]
    ids = torch.empty((m, top_k), dtype=torch.int32, device=router_logits.device)  # [M, k]
    weights = torch.empty((m, top_k), dtype=torch.float32, device=router_logits.device)
    launch_route(router_logits, e_score_correction_bias, top_k, routing, ids=ids, weights=weights)
    return ids, weights


_route_op = torch.library.custom_op("moekit::route", _route_impl, mutates_args=())


@_route_op.register_fake
def _route_fake(router_logits, e_score_correction_bias, top_k, *routing_fields):
    m = router_logits.shape[0]
    return (
        router_logits.new_empty((m, top_k), dtype=torch.int32),
        router_logits.new_empty((m, top_k), dtype=torch.float32),
    )


def _route_packed_impl(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    scoring: str,
    order: str,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
) -> torch.Tensor:
    """Allocate the packed [M, k] int32 output and launch the routing kernel."""
    routing = _routing(scoring, order, renormalize, n_group, topk_group, routed_scaling_factor)
    m = router_logits.shape[0]
    packed = torch.empty((m, top_k), dtype=torch.int32, device=router_logits.device)  # [M, k]
    launch_route(router_logits, e_score_correction_bias, top_k, routing, packed=packed)
    return packed


_route_packed_op = torch.library.custom_op(
    "moekit::route_packed", _route_packed_impl, mutates_args=()
)


@_route_packed_op.register_fake
def _route_packed_fake(router_logits, e_score_correction_bias, top_k, *routing_fields):
    return router_logits.new_empty((router_logits.shape[0], top_k), dtype=torch.int32)


@replayed
def route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    method: str | Routing = "softmax",
    renormalize: bool | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float | None = None,
    e_score_correction_bias: torch.Tensor | None = None,
    packed: bool = False,
    backend: str = "auto",
) -> TopK | torch.Tensor:
    """Choose k of E experts per token and their weights, in one kernel launch.

    Args:
        router_logits: [M, E] bf16/fp16/fp32 (M may be 0; 1 <= E <= 2**15).
        top_k: experts per token, 1 <= top_k <= E.
        method: a preset name ("softmax", "sigmoid", "topk_softmax") or a `Routing`.
        renormalize, n_group, topk_group, routed_scaling_factor: replace the method's
            field of that name when not None.
        e_score_correction_bias: optional [E]; added to the scores for selection only.
        packed: return the packed int32 [M, k] tensor `(id << 16) | bf16_bits(weight)`
            instead of a TopK.
        backend: "auto", "triton" or "reference" (see `moekit.backend`).
    Returns:
        TopK(ids int32 [M, k], weights float32 [M, k]), or int32 [M, k] when `packed`.
    """
    routing = Routing.parse(
        method, renormalize=renormalize, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
    )
    bias = e_score_correction_bias
    check_route_args(router_logits, top_k, routing, bias)
    if resolve_backend(backend, router_logits) == "reference":
        result = reference_routing.route(router_logits, top_k, method=routing,
                                         e_score_correction_bias=bias)
        return pack_topk(result) if packed else result
    # Eager calls skip the custom-op dispatcher (tens of µs of host time per call);
    # torch.compile sees the registered ops.
    if torch.compiler.is_compiling():
        op = _route_packed_op if packed else _route_op
    else:
        op = _route_packed_impl if packed else _route_impl
    out = op(router_logits, bias, top_k, routing.scoring, routing.order, routing.renormalize,
             routing.n_group, routing.topk_group, float(routing.routed_scaling_factor))
    return out if packed else TopK(*out)
