"""moekit: Mixture-of-Experts layers at the speed limit of Hopper GPUs.

The data path of one MoE layer:

    router_logits ─► route() ─► TopK(ids, weights)          (or the packed int32 format)
    hidden ─► fused_experts(): dispatch plan ─► GEMM1 + activation ─► GEMM2 × weight ─► combine

`fused_experts_fp8` runs the same pipeline on fp8 weights (`moekit.quant`) with fp8 GEMM
inputs quantised on the fly; `fused_moe` and `fused_moe_fp8` run route() and the experts
as one call.

On CUDA tensors the ops run Triton kernels; elsewhere they run `moekit.reference`.
`MoE` wraps it all as an `nn.Module` that prepares its weights once.
"""

from moekit.activation import Activation
from moekit.dispatch import dispatch_plan, local_expert_ids
from moekit.dispatch_plan import DispatchPlan
from moekit.experts import fused_experts, fused_moe
from moekit.experts_fp8 import fused_experts_fp8, fused_moe_fp8
from moekit.layer import MoE
from moekit.permute import permute, unpermute
from moekit.routing import Routing, route
from moekit.topk import TopK, pack_topk, unpack_topk
from moekit.tuning import ExpertsConfig, GemmConfig

__all__ = [
    "Activation",
    "DispatchPlan",
    "ExpertsConfig",
    "GemmConfig",
    "MoE",
    "Routing",
    "TopK",
    "dispatch_plan",
    "fused_experts",
    "fused_experts_fp8",
    "fused_moe",
    "fused_moe_fp8",
    "local_expert_ids",
    "pack_topk",
    "permute",
    "route",
    "unpack_topk",
    "unpermute",
]
__version__ = "0.1.0"
