"""moekit: Mixture-of-Experts layers at the speed limit of Hopper GPUs.

The data path of one MoE layer:

    router_logits ─► route() ─► TopK(ids, weights)
    hidden ─► fused_experts(): dispatch plan ─► GEMM1 + activation ─► GEMM2 × weight ─► combine

On CUDA tensors the ops run Triton kernels; elsewhere they run `moekit.reference`.
"""

from moekit.activation import Activation
from moekit.experts import fused_experts, fused_moe
from moekit.topk import TopK

__all__ = ["Activation", "TopK", "fused_experts", "fused_moe"]
__version__ = "0.1.0"
