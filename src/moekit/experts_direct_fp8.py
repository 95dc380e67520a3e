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
from moekit._fp8_quantize import launch_quantize_rows
from moekit._fp8_scales import uniform_along_n, weight_scale_layout
from moekit._intmath import cdiv, next_power_of_2, row_align
from moekit._launch import launcher
from moekit.experts_direct import gemm2_arrivals, gemm2_parts
from moekit.quant.scheme import FULL


def launch_direct_experts_fp8(x_q, x_scale, stride_xsm, w13_q, w13_scale, w2_q, w2_scale,
                              input_scale2, topk_ids, topk_weights, b13, b2, activation, alpha,
                              limit, groups, config, out) -> None:
    """GEMM1, GEMM2's input quantised, GEMM2. `x_q`, `x_scale`, `stride_xsm`: hidden as
    `experts_fp8._gemm1_input` quantised it; `groups` is `experts_fp8._groups_to_list`'s
    form of the scheme, `config` `ExpertsConfig.as_ints`'s; `input_scale2` is GEMM2's
    static input scale, or None when it is quantised dynamically."""
    arrivals = gemm2_arrivals(topk_ids, w2_q.shape[1], config[6:11])
    inter = launch_direct_gemm1_fp8(x_q, x_scale, stride_xsm, w13_q, w13_scale, b13, topk_ids,
                                    w2_q.shape[2], activation, alpha, limit, groups,
                                    config[1:6], arrivals)
    inter_q, inter_scale = quantize_inter(inter, input_scale2, groups[4])
    launch_direct_gemm2_fp8(inter_q, inter_scale, input_scale2 is not None, w2_q, w2_scale, b2,
                            topk_ids, topk_weights, groups, config[6:11], out, arrivals)


def launch_direct_gemm1_fp8(x_q, x_scale, stride_xsm, w13_q, w13_scale, b13, topk_ids,
                            inter_size, activation, alpha, limit, groups, tiles,
                            arrivals=None) -> torch.Tensor:
    """GEMM1 + activation of every pair; returns `inter` [M*k, I] float32 in pair order,
    and zeroes `arrivals` (`experts_direct.gemm2_arrivals`) when given.

    `tiles` is (block_n, block_k, group_m, num_warps, num_stages); group_m is unused.
    """
    num_tokens, hidden_size = x_q.shape
    top_k = topk_ids.shape[1]
    w_group_n, w_group_k, _, a_group_k, _ = groups
    block_n, block_k, _, warps, stages = tiles
    ws = weight_scale_layout(w13_scale, w_group_n, w_group_k)
    x_per_k = a_group_k != FULL
    inter = torch.empty((num_tokens * top_k, inter_size), dtype=torch.float32,
                        device=x_q.device)
    launcher(_direct_gemm1_fp8_kernel)[(num_tokens * top_k, cdiv(inter_size, block_n))](
        x_q, x_scale, w13_q, w13_scale, w13_scale if b13 is None else b13, topk_ids, inter,
        topk_ids if arrivals is None else arrivals, w13_q.shape[0], hidden_size, inter_size,
        top_k, 0 if arrivals is None else arrivals.shape[1], x_q.stride(0), stride_xsm,
        w13_q.stride(0), w13_q.stride(1), *ws[:3], 0 if b13 is None else b13.stride(0),
        inter.stride(0), float(alpha), float(limit),
        ACTIVATION=activation, GATED=activation != "relu2", HAS_BIAS=b13 is not None,
        EVEN_K=hidden_size % block_k == 0, EVEN_N=inter_size % block_n == 0,
        X_PER_K=x_per_k, X_GROUP_K=a_group_k if x_per_k else 1,
        X_GROUPS=_groups(hidden_size, a_group_k), W_PER_K=w_group_k != FULL,
        W_GROUP_N=ws[3], W_GROUP_K=ws[4], W_UNIFORM_N=uniform_along_n(ws, block_n, inter_size),
        W_GROUPS=_groups(hidden_size, w_group_k),
        SHARED_GROUPS=_shared_groups(x_per_k, a_group_k, ws, block_n, inter_size),
        CLEAR_ARRIVALS=arrivals is not None,
        ROW_ALIGN=row_align(hidden_size, inter_size, x_q.stride(0), w13_q.stride(0),
                            w13_q.stride(1), inter.stride(0)),
        BLOCK_N=block_n, BLOCK_K=block_k,
        SUB_K=min([block_k, *(g for g in (a_group_k, w_group_k) if g != FULL)]),
        num_warps=warps, num_stages=stages,
    )
    return inter


def quantize_inter(inter: torch.Tensor, static_scale: torch.Tensor | None,
                   group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GEMM2's input: float32 `inter` → fp8 and its scales, in 1×`group` groups of each row
    ([rows, ceil(I / group)]), or by the static scale (returned as given)."""
    rows, inter_size = inter.shape
    q = torch.empty((rows, inter_size), dtype=torch.float8_e4m3fn, device=inter.device)
    if static_scale is not None:
        scale, mode, group = static_scale, "static", 1
    else:
        scale = torch.empty((rows, cdiv(inter_size, group)), dtype=torch.float32,
                            device=inter.device)
        mode = "group"
    launch_quantize_rows(inter, q, scale, scale.stride(0) if mode == "group" else 0, mode,
                         group)
    return q, scale


def launch_direct_gemm2_fp8(inter_q, inter_scale, static, w2_q, w2_scale, b2, topk_ids,
                            topk_weights, groups, tiles, out, arrivals=None) -> None:
    """GEMM2 (+bias, × router weight) of every token's k slots, summed into `out` [M, H];
    `inter_q`, `inter_scale` are `quantize_inter`'s (`static`: one scale); `tiles` and
    `arrivals` as `experts_direct.launch_direct_gemm2`'s."""
    num_experts, hidden_size, inter_size = w2_q.shape
    num_tokens, top_k = topk_ids.shape
    w_group_n, w_group_k, _, _, inter_group = groups
    block_n, block_k, slots_per_program, warps, stages = tiles
    per_part, parts, partials = gemm2_parts(top_k, slots_per_program, out)
    ws = weight_scale_layout(w2_scale, w_group_n, w_group_k)
    launcher(_direct_gemm2_fp8_kernel)[(num_tokens * parts, cdiv(hidden_size, block_n))](
        inter_q, inter_scale, w2_q, w2_scale, w2_scale if b2 is None else b2, topk_ids,
        topk_weights, out, partials, topk_ids if arrivals is None else arrivals, num_experts,
        hidden_size, inter_size, inter_q.stride(0),
        0 if static else inter_scale.stride(0), w2_q.stride(0), w2_q.stride(1), *ws[:3],
        0 if b2 is None else b2.stride(0), out.stride(0),
        HAS_BIAS=b2 is not None, EVEN_K=inter_size % block_k == 0,
        EVEN_N=hidden_size % block_n == 0, A_STATIC=static,
        A_GROUP_K=1 if static else inter_group,
        A_GROUPS=1 if static else _groups(inter_size, inter_group),
        W_PER_K=w_group_k != FULL, W_GROUP_N=ws[3], W_GROUP_K=ws[4],
        W_UNIFORM_N=uniform_along_n(ws, block_n, 0), W_GROUPS=_groups(inter_size, w_group_k),
        SHARED_GROUPS=_shared_groups(not static, inter_group, ws, block_n, 0),
        TOP_K=top_k, SLOTS=next_power_of_2(top_k), PER_PART=per_part, PARTS=parts,
        ROW_ALIGN=row_align(hidden_size, inter_size, inter_q.stride(0), w2_q.stride(0),
                            w2_q.stride(1), out.stride(0)),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )


def _groups(size: int, group: int) -> int:
    """K groups of `size` held in a register vector: a power of two, 1 with no K groups."""
    return 1 if group == FULL else next_power_of_2(cdiv(size, group))


def _shared_groups(a_per_k: bool, a_group_k: int, ws, block_n: int, first_n: int) -> bool:
    """Whether a direct GEMM can multiply its input's and its weight tile's K-group scales
    together before the loop: both vary along K in the same groups, and the tile's
    columns lie in one weight group (`uniform_along_n`)."""
    return (a_per_k and ws[4] == a_group_k and ws[2] != 0
            and uniform_along_n(ws, block_n, first_n))
