"""Reference fused experts: out[m] = Σ_j w[m, j] · expert_{ids[m, j]}(hidden[m])."""

from __future__ import annotations

import torch

from moekit.activation import Activation
from moekit.reference.activation import apply_activation
from moekit.reference.dispatch import local_expert_ids
from moekit.reference.routing import route
from moekit.routing.method import Routing


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    activation: str | Activation = "silu",
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
) -> torch.Tensor:
    """The experts computation, one expert at a time, accumulating in float32.

    Args:
        hidden: [M, H]. w13: [E, 2I, H] (gated) or [E, I, H] (relu2). w2: [E, H, I].
        topk_ids: [M, k] integer; ids outside [0, E) contribute nothing.
        topk_weights: [M, k] float.
        b13: optional [E, 2I] (or [E, I]); b2: optional [E, H].
        apply_router_weight_on_input: scale the expert's input by the weight instead of
            its output (Llama-4; meaningful for k = 1).
    Returns:
        [M, H] in hidden's dtype.
    """
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    num_experts = w13.shape[0]
    x = hidden.to(acc_dtype)
    out = torch.zeros(hidden.shape, dtype=acc_dtype, device=hidden.device)
    ids = topk_ids.long()
    weights = topk_weights.to(acc_dtype)
    valid = (ids >= 0) & (ids < num_experts)
    for e in torch.unique(ids[valid]).tolist():
        rows, slots = torch.nonzero(ids == e, as_tuple=True)
        w = weights[rows, slots].unsqueeze(1)  # [n, 1]
        xe = x[rows] * w if apply_router_weight_on_input else x[rows]
        h = xe @ w13[e].to(acc_dtype).T  # [n, 2I]
        if b13 is not None:
            h = h + b13[e].to(acc_dtype)
        a = apply_activation(h, activation)  # [n, I]
        y = a @ w2[e].to(acc_dtype).T  # [n, H]
        if b2 is not None:
            y = y + b2[e].to(acc_dtype)
        if not apply_router_weight_on_input:
            y = y * w
        out.index_add_(0, rows, y)
    return out.to(hidden.dtype)


def fused_moe(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    *,
    method: str | Routing = "softmax",
    renormalize: bool | None = None,
    e_score_correction_bias: torch.Tensor | None = None,
    activation: str | Activation = "silu",
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """`route` (softmax, top-k, renormalised by default; `method`, `renormalize` and
    `e_score_correction_bias` as its) followed by `fused_experts`; returns [M, H] in
    hidden's dtype. With `expert_map` the router covers E_global experts and only the
    local ones' pairs are summed (`local_expert_ids`)."""
    ids, weights = route(router_logits, top_k, method=method, renormalize=renormalize,
                         e_score_correction_bias=e_score_correction_bias)
    if expert_map is not None:
        ids = local_expert_ids(ids, expert_map, w13.shape[0])
    return fused_experts(
        hidden, w13, w2, ids, weights, activation=activation, b13=b13, b2=b2,
        apply_router_weight_on_input=apply_router_weight_on_input,
    )
