"""Pure-PyTorch oracles for every moekit op: correct on any device, never fast.

Each fast path is tested against these. They compute in float32 (or float64 when
given float64) and return the dtype the fast path returns.
"""

from moekit.reference.activation import apply_activation
from moekit.reference.dispatch import dispatch_plan, local_expert_ids
from moekit.reference.experts import fused_experts, fused_moe
from moekit.reference.permute import permute, unpermute
from moekit.reference.quant import fused_experts_quantized
from moekit.reference.routing import route, router_logits

__all__ = [
    "apply_activation",
    "dispatch_plan",
    "fused_experts",
    "fused_experts_quantized",
    "fused_moe",
    "local_expert_ids",
    "permute",
    "route",
    "router_logits",
    "unpermute",
]
