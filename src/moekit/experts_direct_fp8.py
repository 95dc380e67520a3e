"""The fp8 direct experts path: decode in two launches, quantisation done inside the GEMMs.

    hidden [M, H] ─► _direct_gemm1_fp8_kernel: per pair, the token row quantised per the
                     scheme × w13[e]ᵀ, scales, bias, activation   ─► inter fp32 [M*k, I]
                  ─► _direct_gemm2_fp8_kernel: per token, Σ_j w_j·(quantised inter row ×
                     w2[e_j]ᵀ, scales, + b2)                       ─► out [M, H]

The plan path's fp8 decode is five or six launches (amax, quantise, plan, two GEMMs,
combine) around two GEMMs that stream a few tens of MB; here it is two, like the 16-bit
direct path (`moekit.experts_direct`). `moekit._direct_fp8_kernels` says where the
quantisation moved and why the result is the same. Chosen by `ExpertsConfig.block_m` =
`DIRECT_BLOCK_M`.
"""

from __future__ import annotations

import torch

from moekit._direct_fp8_kernels import _direct_gemm1_fp8_kernel, _direct_gemm2_fp8_kernel
from moekit._fp8_scales import activation_mode, uniform_along_n, weight_scale_layout
from moekit._intmath import cdiv, next_power_of_2
from moekit.quant import AMAX_FLOOR
from moekit.quant.scheme import FULL

_FMAX = 448.0
_MAX_ROW_CHUNK = 4096  # values of a row a GEMM1 program reads at once for a row's amax


def launch_direct_experts_fp8(hidden, w13_q, w13_scale, w2_q, w2_scale, input_scale13,
                              input_scale2, topk_ids, topk_weights, b13, b2, activation, alpha,
                              limit, groups, config, out) -> None:
    """Both direct fp8 launches. `groups` is `experts_fp8._groups_to_list`'s form of the
    scheme, `config` `ExpertsConfig.as_ints`'s; the input scales are given exactly when the
    scheme's activations are static."""
    inter = launch_direct_gemm1_fp8(hidden, w13_q, w13_scale, input_scale13, b13, topk_ids,
                                    w2_q.shape[2], activation, alpha, limit, groups,
                                    config[1:6])
    launch_direct_gemm2_fp8(inter, w2_q, w2_scale, input_scale2, b2, topk_ids, topk_weights,
                            groups, config[6:11], out)


def launch_direct_gemm1_fp8(hidden, w13_q, w13_scale, input_scale, b13, topk_ids, inter_size,
                            activation, alpha, limit, groups, tiles) -> torch.Tensor:
    """GEMM1 + activation of every pair; returns `inter` [M*k, I] float32 in pair order.

    `tiles` is (block_n, block_k, group_m, num_warps, num_stages); group_m is unused.
    """
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    w_group_n, w_group_k, a_group_m, a_group_k, _ = groups
    block_n, block_k, _, warps, stages = tiles
    mode = activation_mode(a_group_m, a_group_k, input_scale)
    ws = weight_scale_layout(w13_scale, w_group_n, w_group_k)
    dummy = w13_scale  # stands in for an absent bias or static scale; never read
    inter = torch.empty((num_tokens * top_k, inter_size), dtype=torch.float32,
                        device=hidden.device)
    _direct_gemm1_fp8_kernel[(num_tokens * top_k, cdiv(inter_size, block_n))](
        hidden, dummy if input_scale is None else input_scale, w13_q, w13_scale,
        dummy if b13 is None else b13, topk_ids, inter, num_tokens, w13_q.shape[0], hidden_size,
        inter_size, top_k, hidden.stride(0), w13_q.stride(0), w13_q.stride(1), *ws[:3],
        0 if b13 is None else b13.stride(0), inter.stride(0), float(alpha), float(limit),
        ACTIVATION=activation, GATED=activation != "relu2", HAS_BIAS=b13 is not None,
        EVEN_K=hidden_size % block_k == 0, EVEN_N=inter_size % block_n == 0,
        X_MODE=mode, X_GROUP_K=a_group_k if mode == "group" else 1,
        W_PER_K=w_group_k != FULL, W_GROUP_N=ws[3], W_GROUP_K=ws[4],
        W_UNIFORM_N=uniform_along_n(ws, block_n, inter_size),
        FMAX=_FMAX, AMAX_FLOOR=AMAX_FLOOR,
        ROW_CHUNK=min(next_power_of_2(hidden_size), _MAX_ROW_CHUNK),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return inter


def launch_direct_gemm2_fp8(inter, w2_q, w2_scale, input_scale, b2, topk_ids, topk_weights,
                            groups, tiles, out) -> None:
    """GEMM2 (+bias, × router weight) of every token's k slots, summed into `out` [M, H];
    `inter` is `launch_direct_gemm1_fp8`'s."""
    num_experts, hidden_size, inter_size = w2_q.shape
    num_tokens, top_k = topk_ids.shape
    w_group_n, w_group_k, _, _, inter_group = groups
    block_n, block_k, _, warps, stages = tiles
    ws = weight_scale_layout(w2_scale, w_group_n, w_group_k)
    static = input_scale is not None
    dummy = w2_scale  # stands in for an absent bias or static scale; never read
    _direct_gemm2_fp8_kernel[(num_tokens, cdiv(hidden_size, block_n))](
        inter, input_scale if static else dummy, w2_q, w2_scale, dummy if b2 is None else b2,
        topk_ids, topk_weights, out, num_experts, hidden_size, inter_size, inter.stride(0),
        w2_q.stride(0), w2_q.stride(1), *ws[:3], 0 if b2 is None else b2.stride(0),
        out.stride(0),
        HAS_BIAS=b2 is not None, EVEN_K=inter_size % block_k == 0,
        EVEN_N=hidden_size % block_n == 0, INTER_STATIC=static,
        INTER_GROUP=1 if static else inter_group, W_PER_K=w_group_k != FULL,
        W_GROUP_N=ws[3], W_GROUP_K=ws[4], W_UNIFORM_N=uniform_along_n(ws, block_n, 0),
        K_GROUPS=next_power_of_2(cdiv(inter_size, ws[4])) if w_group_k != FULL else 1,
        FMAX=_FMAX, AMAX_FLOOR=AMAX_FLOOR, TOP_K=top_k, SLOTS=next_power_of_2(top_k),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
