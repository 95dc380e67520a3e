"""The fp8 direct experts path: decode without a dispatch plan or a separate combine.

    hidden [M, H] ─► _quantize_rows_kernel (the plan path's): fp8 rows + scales; zeroes
                     GEMM1's group counters on the way
                  ─► _direct_gemm1_fp8_kernel: per pair, fp8 row × w13[e]ᵀ, scales, bias,
                     activation, quantised for GEMM2 in the epilogue — 1×g groups (a
                     group's last program to arrive quantises it whole) or the static
                     scale                                       ─► fp8 inter [M*k, I]
                  ─► _direct_gemm2_fp8_kernel: per token (or part of its slots),
                     Σ_j w_j·(fp8 inter row × w2[e_j]ᵀ, scales, + b2) ─► out [M, H]

The plan path's fp8 decode is four or five launches (amax, plan with quantise, GEMM1,
GEMM2, combine); this is three, the GEMMs as lean as the 16-bit direct path's
(`moekit.experts_direct`), and the combine fused and deterministic. Why hidden is
quantised by a kernel of its own rather than inside GEMM1: `moekit._direct_fp8_kernels`.
Chosen by `ExpertsConfig.block_m` = `DIRECT_BLOCK_M`.
"""

from __future__ import annotations

import torch

from moekit._direct_fp8_kernels import _direct_gemm1_fp8_kernel, _direct_gemm2_fp8_kernel
from moekit._direct_kernels import ROWS
from moekit._fp8_quantize import AMAX_FLOOR, FMAX
from moekit._fp8_scales import uniform_along_n, weight_scale_layout
from moekit._fp8_swap import launch_stages, swap_ab
from moekit._intmath import cdiv, next_power_of_2, row_align
from moekit._launch import launcher
from moekit.experts_direct import gemm2_arrivals, gemm2_parts
from moekit.quant.scheme import FULL


def gemm1_group_counts(topk_ids: torch.Tensor, inter_size: int, inter_group: int,
                       static: bool, block_n: int) -> torch.Tensor | None:
    """GEMM1's arrival counters [M*k, groups of I] when a 1×g group of GEMM2's input spans
    several of its column tiles, else None. The hidden quantiser zeroes them
    (`launch_quantize_rows`' `clear`): it runs before GEMM1 in every call."""
    if static or block_n % inter_group == 0:
        return None
    return torch.empty((topk_ids.numel(), cdiv(inter_size, inter_group)), dtype=torch.int32,
                       device=topk_ids.device)


def launch_direct_experts_fp8(x_q, x_scale, stride_xsm, w13_q, w13_scale, w2_q, w2_scale,
                              input_scale2, topk_ids, topk_weights, b13, b2, activation, alpha,
                              limit, groups, config, out, group_counts) -> None:
    """GEMM1 (GEMM2's input quantised in its epilogue), GEMM2. `x_q`, `x_scale`,
    `stride_xsm`: hidden as `experts_fp8._gemm1_input` quantised it, zeroing
    `group_counts` (`gemm1_group_counts`'); `groups` is `experts_fp8._groups_to_list`'s
    form of the scheme, `config` `ExpertsConfig.as_ints`'s; `input_scale2` is GEMM2's
    static input scale, or None when it is quantised dynamically."""
    arrivals = gemm2_arrivals(topk_ids, w2_q.shape[1], config[6:11])
    inter_q, inter_scale = launch_direct_gemm1_fp8(
        x_q, x_scale, stride_xsm, w13_q, w13_scale, b13, topk_ids, w2_q.shape[2], activation,
        alpha, limit, groups, input_scale2, config[1:6], group_counts, arrivals)
    launch_direct_gemm2_fp8(inter_q, inter_scale, input_scale2 is not None, w2_q, w2_scale, b2,
                            topk_ids, topk_weights, groups, config[6:11], out, arrivals)


def launch_direct_gemm1_fp8(x_q, x_scale, stride_xsm, w13_q, w13_scale, b13, topk_ids,
                            inter_size, activation, alpha, limit, groups, input_scale2, tiles,
                            group_counts=None, arrivals=None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """GEMM1 + activation of every pair, quantised as GEMM2's input: returns (fp8 `inter`
    [M*k, I] in pair order, its scales [M*k, groups of I] — or `input_scale2`, the static
    scale, as given); zeroes `arrivals` (`experts_direct.gemm2_arrivals`) when given.

    `tiles` is (block_n, block_k, group_m, num_warps, num_stages); group_m is unused.
    `group_counts` are `gemm1_group_counts`', zero on entry.
    """
    num_tokens, hidden_size = x_q.shape
    top_k = topk_ids.shape[1]
    w_group_n, w_group_k, _, a_group_k, inter_group = groups
    block_n, block_k, _, warps, stages = tiles
    ws = weight_scale_layout(w13_scale, w_group_n, w_group_k)
    x_per_k = a_group_k != FULL
    static = input_scale2 is not None
    rows = num_tokens * top_k
    inter = torch.empty((rows, inter_size), dtype=torch.float8_e4m3fn, device=x_q.device)
    if static:
        mode, inter_group, inter_scale = "static", 1, input_scale2
    else:
        mode = "groups" if block_n % inter_group == 0 else "last"
        inter_scale = torch.empty((rows, cdiv(inter_size, inter_group)), dtype=torch.float32,
                                  device=x_q.device)
    if mode == "last":
        if group_counts is None:
            raise ValueError("GEMM1's groups span column tiles: group_counts are needed")
        scratch = torch.empty((rows, inter_size), dtype=torch.float32, device=x_q.device)
    else:
        scratch = group_counts = inter_scale  # stand-ins; never read
    gated = activation != "relu2"
    swap = swap_ab("direct1", ROWS.value, 2 * block_n if gated else block_n,
                   w_group_k != FULL)
    launcher(_direct_gemm1_fp8_kernel)[(rows, cdiv(inter_size, block_n))](
        x_q, x_scale, w13_q, w13_scale, w13_scale if b13 is None else b13, topk_ids, inter,
        inter_scale, scratch, group_counts, topk_ids if arrivals is None else arrivals,
        w13_q.shape[0], hidden_size, inter_size, top_k,
        0 if arrivals is None else arrivals.shape[1], x_q.stride(0), stride_xsm,
        w13_q.stride(0), w13_q.stride(1), *ws[:3], 0 if b13 is None else b13.stride(0),
        inter.stride(0), 0 if static else inter_scale.stride(0), float(alpha), float(limit),
        ACTIVATION=activation, GATED=gated, HAS_BIAS=b13 is not None,
        EVEN_K=hidden_size % block_k == 0, EVEN_N=inter_size % block_n == 0,
        X_PER_K=x_per_k, X_GROUP_K=a_group_k if x_per_k else 1,
        X_GROUPS=_groups(hidden_size, a_group_k), W_PER_K=w_group_k != FULL,
        W_GROUP_N=ws[3], W_GROUP_K=ws[4], W_UNIFORM_N=uniform_along_n(ws, block_n, inter_size),
        W_GROUPS=_groups(hidden_size, w_group_k),
        SHARED_GROUPS=_shared_groups(x_per_k, a_group_k, ws, block_n, inter_size),
        CLEAR_ARRIVALS=arrivals is not None, INTER_MODE=mode, INTER_GROUP=inter_group,
        ROW_ALIGN=row_align(hidden_size, inter_size, x_q.stride(0), w13_q.stride(0),
                            w13_q.stride(1), inter.stride(0)),
        FMAX=FMAX, AMAX_FLOOR=AMAX_FLOOR, BLOCK_N=block_n, BLOCK_K=block_k,
        SUB_K=min([block_k, *(g for g in (a_group_k, w_group_k) if g != FULL)]),
        SWAP_AB=swap, num_warps=warps,
        num_stages=launch_stages(swap, stages, cdiv(hidden_size, block_k)),
    )
    return inter, inter_scale


def launch_direct_gemm2_fp8(inter_q, inter_scale, static, w2_q, w2_scale, b2, topk_ids,
                            topk_weights, groups, tiles, out, arrivals=None) -> None:
    """GEMM2 (+bias, × router weight) of every token's k slots, summed into `out` [M, H];
    `inter_q`, `inter_scale` are `launch_direct_gemm1_fp8`'s (`static`: one scale); `tiles`
    and `arrivals` as `experts_direct.launch_direct_gemm2`'s."""
    num_experts, hidden_size, inter_size = w2_q.shape
    num_tokens, top_k = topk_ids.shape
    w_group_n, w_group_k, _, _, inter_group = groups
    block_n, block_k, slots_per_program, warps, stages = tiles
    per_part, parts, partials = gemm2_parts(top_k, slots_per_program, out)
    ws = weight_scale_layout(w2_scale, w_group_n, w_group_k)
    swap = swap_ab("direct2", ROWS.value, block_n, w_group_k != FULL)
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
        BLOCK_N=block_n, BLOCK_K=block_k, SWAP_AB=swap, num_warps=warps,
        num_stages=launch_stages(swap, stages, cdiv(inter_size, block_k)),
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
