"""Placeholder: replaced by the Triton pipeline (being written)."""

from moekit import reference


def fused_experts(hidden, w13, w2, topk_ids, topk_weights, *, activation="silu", b13=None,
                  b2=None, apply_router_weight_on_input=False, backend="auto"):
    return reference.fused_experts(hidden, w13, w2, topk_ids, topk_weights,
                                   activation=activation, b13=b13, b2=b2,
                                   apply_router_weight_on_input=apply_router_weight_on_input)


def fused_moe(hidden, router_logits, w13, w2, top_k, *, renormalize=True, activation="silu",
              b13=None, b2=None, backend="auto"):
    return reference.fused_moe(hidden, router_logits, w13, w2, top_k, renormalize=renormalize,
                               activation=activation, b13=b13, b2=b2)
