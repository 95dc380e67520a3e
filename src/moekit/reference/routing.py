"""Reference routing: logits → selection keys → (group filter) → top-k → weights.

The semantics every backend follows (see `moekit.routing` for the full contract):

- NaN logits count as −inf. Experts are ranked by a selection key, highest first, ties
  to the lower expert id, so ids are always k distinct experts in [0, E).
- The key is the raw logit when no bias and no groups are used (scoring is monotone);
  otherwise it is the score (softmax or sigmoid) plus the bias, NaN again counting as −inf.
- Groups: the score of a group is the sum of its top-2 keys (NaN → −inf); the
  `topk_group` best groups are kept (ties to the lower group id) and only their experts
  can be chosen.
- Weights are the unbiased scores of the chosen experts (softmax over the k logits for
  "topk_then_score"), divided by (their sum + 1e-20) when renormalising, times the
  routed scaling factor. They follow IEEE arithmetic: a softmax over a row with a +inf
  logit, or with no logit above −inf, is NaN.
"""

from __future__ import annotations

import torch

from moekit.routing.method import Routing, check_route_args
from moekit.topk import TopK

_REFERENCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _nan_to_neg_inf(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(t), float("-inf"), t)


def _scores(x: torch.Tensor, scoring: str) -> torch.Tensor:
    return torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)


def _rank(keys: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Column order by descending key, ties to the lower column; excluded columns last."""
    # torch.topk is not guaranteed stable on ties; a stable descending sort is.
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
    if excluded is not None:
        last = torch.sort(excluded.gather(-1, order).to(torch.uint8), dim=-1, stable=True)
        order = order.gather(-1, last.indices)
    return order


def selection_keys(
    router_logits: torch.Tensor, routing: Routing, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The keys experts are ranked by, and the scores of the groups (None without groups).

    Args:
        router_logits: [M, E] float; computed in float64 when given float64, else float32.
        routing: the method. bias: optional [E] score-correction bias.
    Returns:
        keys [M, E] and group scores [M, n_group] (or None), NaN replaced by −inf.
    """
    dtype = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    x = _nan_to_neg_inf(router_logits.to(dtype))
    if routing.selects_on_logits(bias is not None):
        return x, None
    keys = _scores(x, routing.scoring)
    if bias is not None:
        keys = keys + bias.to(dtype)
    keys = _nan_to_neg_inf(keys)
    if routing.n_group == 1:
        return keys, None
    m, e = keys.shape
    grouped = keys.view(m, routing.n_group, e // routing.n_group)
    top2 = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values  # [M, G, ≤2]
    return keys, _nan_to_neg_inf(top2.sum(dim=-1))


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
) -> TopK:
    """Route M tokens to k of E experts (arguments as in `moekit.routing.route`).

    Args:
        router_logits: [M, E] float (float64 computes in float64).
        top_k: experts per token, 1 <= top_k <= E.
    Returns:
        TopK with ids int32 [M, k] and weights float32 [M, k].
    """
    routing = Routing.parse(
        method, renormalize=renormalize, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
    )
    bias = e_score_correction_bias
    check_route_args(router_logits, top_k, routing, bias, dtypes=_REFERENCE_DTYPES)
    keys, group_scores = selection_keys(router_logits, routing, bias)
    excluded = None
    if group_scores is not None:
        m, e = keys.shape
        kept_groups = _rank(group_scores)[:, : routing.topk_group]  # [M, topk_group]
        dropped = torch.ones_like(group_scores, dtype=torch.bool)
        dropped.scatter_(1, kept_groups, False)
        excluded = dropped.repeat_interleave(e // routing.n_group, dim=1)  # [M, E]
    ids = _rank(keys, excluded)[:, :top_k]  # [M, k]

    x = _nan_to_neg_inf(router_logits.to(keys.dtype))
    if routing.softmax_over_topk:
        weights = torch.softmax(x.gather(1, ids), dim=-1)
    else:
        weights = _scores(x, routing.scoring).gather(1, ids)
    if routing.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routing.routed_scaling_factor
    return TopK(ids.to(torch.int32), weights.to(torch.float32))


def router_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A router's logits [M, E]: hidden [M, H] · weight [E, H]ᵀ in fp32, rounded once to
    hidden's dtype (as `nn.Linear` on a GPU accumulates)."""
    wide = torch.promote_types(hidden.dtype, torch.float32)
    return (hidden.to(wide) @ weight.to(wide).T).to(hidden.dtype)
