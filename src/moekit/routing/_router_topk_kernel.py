"""Triton body of `router_topk`: hidden [M, H] and a router weight [E, H] to top-k ids and
weights in one launch, for the decode sizes the router GEMV serves (M ≤ ROWS).

    every program   its BLOCK_E experts' logits for all M tokens (`_gemv_experts`) → logits
    last to arrive  routes the M rows from those logits (`_route_rows`)         → ids, weights

The layer's decode otherwise runs the GEMV and `route` as two launches, the second a
whole launch's ramp for a few hundred elements. Arrival: each program's logits stores are
issued before its acquire-release arrival on `counter_ptr`; the program that arrives
last reads them back past L1 (".cg") and resets the counter to zero for the next call,
so a persistent, zeroed counter serves every call (and CUDA-graph replay) without a
launch of its own. Logits are rounded to hidden's dtype before routing, as
`route(router_logits(...))` sees them.
"""

import triton
import triton.language as tl

from moekit.routing._kernels import _route_rows
from moekit.routing._logits_kernel import _gemv_experts


# M is not specialised: one binary serves every M up to ROWS.
@triton.jit(do_not_specialize=["M"])
def _router_topk_kernel(
    hidden_ptr,  # [M, H], rows at stride_hm, unit column stride
    weight_ptr,  # [E, H], rows at stride_we, unit column stride
    logits_ptr,  # [M, E] contiguous, hidden's dtype: scratch, written then read back
    counter_ptr,  # [1] int32, zero before the launch and after it
    ids_ptr,  # [M, TOP_K] int32, out
    weights_ptr,  # [M, TOP_K] fp32, out
    M,
    E,
    H,
    stride_hm,
    stride_we,
    routed_scaling_factor,
    ROWS: tl.constexpr,  # ≥ M
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SOFTMAX_OVER_TOPK: tl.constexpr,
    SELECT_ON_LOGITS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    TOP_K: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(E, BLOCK_E),)."""
    _gemv_experts(hidden_ptr, weight_ptr, logits_ptr, M, E, H, stride_hm, stride_we, ROWS,
                  BLOCK_E, BLOCK_H)
    tl.debug_barrier()  # every thread's stores issued before the arrival
    arrived = tl.atomic_add(counter_ptr, 1)  # acquire-release, GPU scope
    if arrived == tl.num_programs(0) - 1:
        tl.atomic_xchg(counter_ptr, 0)
        _route_rows(logits_ptr, logits_ptr, ids_ptr, weights_ptr, ids_ptr, tl.arange(0, ROWS),
                    M, E, 1, 0, routed_scaling_factor, SOFTMAX, SOFTMAX_OVER_TOPK,
                    SELECT_ON_LOGITS, False, RENORMALIZE, False, TOP_K, N_GROUP, TOPK_GROUP,
                    GROUP_SIZE, BLOCK_G, BLOCK_S, BLOCK_K, ".cg")
