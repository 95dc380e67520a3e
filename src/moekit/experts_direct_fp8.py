"""The fp8 direct experts path: decode without a dispatch plan or a separate combine.

    hidden [M, H] ─► _quantize_rows_kernel (the plan path's): fp8 rows + scales
                  ─► _direct_gemm1_fp8_kernel: per pair, fp8 row × w13[e]ᵀ, scales, bias,
                     activation                                   ─► inter fp32 [M*k, I]
                  ─► _quantize_rows_kernel: 1×g groups (or the static scale) ─► fp8 inter
                  ─► _direct_gemm2_fp8_kernel: per token (or part of its slots),
                     Σ_j w_j·(fp8 inter row × w2[e_j]ᵀ, scales, + b2) ─► out [M, H]

The plan path's fp8 decode is five or six launches (amax, quantise, plan, GEMM1, GEMM2,
combine); this is four, the GEMMs as lean as the 16-bit direct path's
(`moekit.experts_direct`), and the combine fused and deterministic. Why both GEMM inputs
are quantised by a kernel of their own rather than inside the GEMMs:
`moekit._direct_fp8_kernels`. Chosen by `ExpertsConfig.block_m` = `DIRECT_BLOCK_M`.
"""

from __future__ import annotations

import torch

from moekit._direct_fp8_kernels import _direct_gemm1_fp8_kernel, _direct_gemm2_fp8_kernel
from moekit._fp8_quantize import (
    FMAX,
    Fp8Rows,
    empty_fp8_rows,
    launch_quantize_rows,
)
from moekit._fp8_scales import activation_mode, uniform_along_n, weight_scale_layout
from moekit._intmath import cdiv, next_power_of_2
from moekit.experts_direct import gemm2_arrivals, gemm2_parts
from moekit.quant import AMAX_FLOOR
from moekit.quant.scheme import FULL


def launch_direct_experts_fp8(hidden, input_scale13, w13_q, w13_scale, w2_q, w2_scale,
                              input_scale2, topk_ids, topk_weights, b13, b2, activation, alpha,
                              limit, groups, config, out, fold_quantizers=True) -> None:
    """GEMM1 and GEMM2, each quantising its own input (`fold_quantizers`, the default), or
    each input quantised by a launch of its own first. `groups` is
    `experts_fp8._groups_to_list`'s form of the scheme, `config` `ExpertsConfig.as_ints`'s;
    `input_scale13`, `input_scale2` the GEMMs' static input scales, or None for dynamic."""
    arrivals = gemm2_arrivals(topk_ids, w2_q.shape[1], config[6:11])
    x = gemm1_input_rows(hidden, groups, input_scale13)
    if not fold_quantizers:
        quantize_rows(hidden, x)
    inter = launch_direct_gemm1_fp8(hidden, x, fold_quantizers, w13_q, w13_scale, b13,
                                    topk_ids, w2_q.shape[2], activation, alpha, limit, groups,
                                    config[1:6], arrivals)
    inter_q = gemm2_input_rows(inter, groups, input_scale2)
    if not fold_quantizers:
        quantize_rows(inter, inter_q)
    launch_direct_gemm2_fp8(inter, inter_q, fold_quantizers, w2_q, w2_scale, b2, topk_ids,
                            topk_weights, groups, config[6:11], out, arrivals)


def gemm1_input_rows(hidden: torch.Tensor, groups, static_scale) -> Fp8Rows:
    """The buffers of hidden quantised as GEMM1 reads it (a per-tensor scale from all rows:
    the direct path has a handful)."""
    rows = empty_fp8_rows(hidden, activation_mode(groups[2], groups[3], static_scale),
                          groups[3], static_scale)
    return rows._replace(mode="tensor_rows") if rows.mode == "tensor" else rows


def gemm2_input_rows(inter: torch.Tensor, groups, static_scale) -> Fp8Rows:
    """The buffers of GEMM2's input: `inter` in 1×g groups of each row, or the static scale."""
    mode = "group" if static_scale is None else "static"
    return empty_fp8_rows(inter, mode, groups[4], static_scale)


def quantize_rows(x: torch.Tensor, rows: Fp8Rows) -> None:
    """x → `rows` by the row quantiser's own launch (the unfolded path)."""
    launch_quantize_rows(x, rows.x, rows.scale, rows.stride_sm, rows.mode, rows.group_k)


def launch_direct_gemm1_fp8(hidden, x, quantize, w13_q, w13_scale, b13, topk_ids, inter_size,
                            activation, alpha, limit, groups, tiles,
                            arrivals=None) -> torch.Tensor:
    """GEMM1 + activation of every pair; returns `inter` [M*k, I] float32 in pair order,
    and zeroes `arrivals` (`experts_direct.gemm2_arrivals`) when given. `x`
    (`gemm1_input_rows`) holds hidden quantised, or is written from `hidden` by each
    program first when `quantize`.

    `tiles` is (block_n, block_k, group_m, num_warps, num_stages); group_m is unused.
    """
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    w_group_n, w_group_k, _, a_group_k, _ = groups
    block_n, block_k, _, warps, stages = tiles
    ws = weight_scale_layout(w13_scale, w_group_n, w_group_k)
    x_per_k = a_group_k != FULL
    inter = torch.empty((num_tokens * top_k, inter_size), dtype=torch.float32,
                        device=hidden.device)
    _direct_gemm1_fp8_kernel[(num_tokens * top_k, cdiv(inter_size, block_n))](
        hidden, x.x, x.scale, w13_q, w13_scale, w13_scale if b13 is None else b13, topk_ids,
        inter, topk_ids if arrivals is None else arrivals, w13_q.shape[0], num_tokens,
        hidden_size, inter_size, top_k, 0 if arrivals is None else arrivals.shape[1],
        hidden.stride(0), x.x.stride(0), x.stride_sm, w13_q.stride(0), w13_q.stride(1),
        *ws[:3], 0 if b13 is None else b13.stride(0), inter.stride(0), float(alpha),
        float(limit),
        ACTIVATION=activation, GATED=activation != "relu2", HAS_BIAS=b13 is not None,
        EVEN_K=hidden_size % block_k == 0, EVEN_N=inter_size % block_n == 0,
        X_PER_K=x_per_k, X_GROUP_K=a_group_k if x_per_k else 1,
        X_GROUPS=_groups(hidden_size, a_group_k), W_PER_K=w_group_k != FULL,
        W_GROUP_N=ws[3], W_GROUP_K=ws[4], W_UNIFORM_N=uniform_along_n(ws, block_n, inter_size),
        W_GROUPS=_groups(hidden_size, w_group_k), CLEAR_ARRIVALS=arrivals is not None,
        QUANTIZE_X=quantize, X_MODE=x.mode, X_ROWS=next_power_of_2(num_tokens), FMAX=FMAX,
        AMAX_FLOOR=AMAX_FLOOR, QUANT_BLOCK=max(next_power_of_2(hidden_size), x.group_k),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return inter


def launch_direct_gemm2_fp8(inter, inter_q, quantize, w2_q, w2_scale, b2, topk_ids,
                            topk_weights, groups, tiles, out, arrivals=None) -> None:
    """GEMM2 (+bias, × router weight) of every token's k slots, summed into `out` [M, H].
    `inter_q` (`gemm2_input_rows`) holds GEMM1's float32 output `inter` quantised, or is
    written from it by each program first (its slots' rows) when `quantize`; `tiles` and
    `arrivals` as `experts_direct.launch_direct_gemm2`'s."""
    num_experts, hidden_size, inter_size = w2_q.shape
    num_tokens, top_k = topk_ids.shape
    w_group_n, w_group_k, _, _, _ = groups
    block_n, block_k, slots_per_program, warps, stages = tiles
    per_part, parts, partials = gemm2_parts(top_k, slots_per_program, out)
    ws = weight_scale_layout(w2_scale, w_group_n, w_group_k)
    static = inter_q.mode == "static"
    _direct_gemm2_fp8_kernel[(num_tokens * parts, cdiv(hidden_size, block_n))](
        inter, inter_q.x, inter_q.scale, w2_q, w2_scale, w2_scale if b2 is None else b2,
        topk_ids, topk_weights, out, partials, topk_ids if arrivals is None else arrivals,
        num_experts, hidden_size, inter_size, inter.stride(0), inter_q.x.stride(0),
        inter_q.stride_sm, w2_q.stride(0), w2_q.stride(1), *ws[:3],
        0 if b2 is None else b2.stride(0), out.stride(0),
        HAS_BIAS=b2 is not None, EVEN_K=inter_size % block_k == 0,
        EVEN_N=hidden_size % block_n == 0, A_STATIC=static, A_GROUP_K=inter_q.group_k,
        A_GROUPS=1 if static else _groups(inter_size, inter_q.group_k),
        W_PER_K=w_group_k != FULL, W_GROUP_N=ws[3], W_GROUP_K=ws[4],
        W_UNIFORM_N=uniform_along_n(ws, block_n, 0), W_GROUPS=_groups(inter_size, w_group_k),
        TOP_K=top_k, SLOTS=next_power_of_2(top_k), PER_PART=per_part, PARTS=parts,
        QUANTIZE_A=quantize, FMAX=FMAX, AMAX_FLOOR=AMAX_FLOOR,
        QUANT_BLOCK=max(next_power_of_2(inter_size), inter_q.group_k),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )


def _groups(size: int, group: int) -> int:
    """K groups of `size` held in a register vector: a power of two, 1 with no K groups."""
    return 1 if group == FULL else next_power_of_2(cdiv(size, group))
