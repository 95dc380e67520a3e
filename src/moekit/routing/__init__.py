"""Routing: router logits [M, E] → top-k experts per token and their weights.

Pipeline, one fused kernel launch (`_kernels._route_kernel`):

    logits ─► NaN→−inf ─► selection key ─► keep topk_group groups ─► top-k ─► weights
                           (logit, or score       (by top-2 key sum)   (ties →    (renormalise,
                            + bias)                                    lower id)   × scale)
           ─► ids int32 [M, k] + weights fp32 [M, k], or packed int32 [M, k]

The method is a value, `Routing` (see `moekit.routing.method`), or a preset name:

    model family                   call
    Qwen-MoE, OLMoE, DBRX, ...     route(logits, k)                         softmax, top-k, renorm
    Mixtral, gpt-oss               route(logits, k, method="topk_softmax")  top-k, softmax over k
    DeepSeek-V3, Kimi-K2           route(logits, 8, method="sigmoid", n_group=8, topk_group=4,
                                         routed_scaling_factor=2.5, e_score_correction_bias=b)
    Llama-4                        route(logits, 1, method="sigmoid", renormalize=False)
                                   (the experts op applies the weight to the input)

Semantics, identical on every backend:
- Ties break to the lower expert id (and the lower group id), deterministically.
- NaN logits (and NaN keys, e.g. +inf + −inf) rank as −inf; the k ids of a row are
  always distinct and in [0, E), whatever the logits hold.
- Experts are ranked by the raw logit when there is no bias and no groups (scoring is
  monotone, so this ranks the scores without exp() rounding deciding near-ties);
  otherwise by score + bias, and groups by the sum of their top-2 keys.
- Weights are the unbiased scores of the chosen experts, / (sum + 1e-20) when
  renormalising, × routed_scaling_factor, in IEEE arithmetic: a softmax over a row that
  holds +inf, or nothing above −inf, gives NaN weights; sigmoid weights stay finite.
- Backends (`moekit.backend`): the Triton kernel on CUDA tensors, the reference
  (`moekit.reference.routing`) elsewhere. One program routes a block of rows, each row
  loaded once as one register tile: fast up to E = 512, correct up to E = 2**15 (the
  packed format's id limit), k up to E. No host sync, no data-dependent allocation:
  CUDA-graph safe; the launchers are `torch.library` custom ops (`moekit::route`,
  `moekit::route_packed`) with fake implementations for `torch.compile`.
- `router_logits(hidden, weight)`: the router GEMM (fp32 accumulation, one rounding, as
  `nn.Linear`): one GEMV kernel up to 16 tokens, cuBLAS above (`moekit.routing.logits`).
- `router_topk(hidden, weight, top_k, counter)`: `route(router_logits(...))` in one launch
  up to 16 tokens (no score-correction bias), which `MoE.forward` runs at decode; `counter`
  is a zeroed int32 [1] that each call leaves zero (`moekit.routing.router_topk`).
- Packed (TensorRT-LLM routed-MoE input): `(id << 16) | b` with b the bf16 bit pattern
  of the weight (round to nearest even, NaN → 0x7FC0), never sign-extended into the id.
  Returned by `route(..., packed=True)` straight from the kernel; `moekit.topk.pack_topk`
  / `unpack_topk` convert a TopK.
"""

from moekit.routing.logits import router_logits
from moekit.routing.method import PRESETS, Routing
from moekit.routing.ops import route
from moekit.routing.router_topk import router_topk

__all__ = ["PRESETS", "Routing", "route", "router_logits", "router_topk"]
