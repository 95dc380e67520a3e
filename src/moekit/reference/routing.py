"""Reference routing: scores → top-k → weights. Ties break to the lower expert id."""

from __future__ import annotations

import torch

from moekit.topk import TopK


def route(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True) -> TopK:
    """Softmax over experts, top-k, optional renormalisation of the k weights to sum 1.

    Args:
        router_logits: [M, E] float.
    Returns:
        TopK with ids int32 [M, k] and weights float32 [M, k].
    """
    scores = torch.softmax(router_logits.float(), dim=-1)  # [M, E]
    # torch.topk is not guaranteed stable on ties; a stable descending sort is.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = torch.gather(scores, 1, order)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return TopK(order.to(torch.int32), weights)
