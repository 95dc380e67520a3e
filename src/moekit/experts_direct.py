"""The direct experts path: decode without a dispatch plan or a separate combine.

    hidden [M, H] ─► _direct_gemm1_kernel: per pair, token row × w13[e]ᵀ (+b13), activation
                                                                    ─► inter [M*k, I]
                  ─► _direct_gemm2_kernel: per token (or part of its slots),
                     Σ_j w_j·(inter row × w2[e_j]ᵀ + b2)             ─► out [M, H]

With one or two rows per expert the plan path's four launches (plan, GEMM1, GEMM2,
combine) cost more than the GEMMs' row tiles save: each launch is a few µs of a
layer that streams its weights in tens. Here the ids are read straight from topk_ids
and GEMM2 sums a token's k slots itself, in slot order (deterministic), so the layer
is two launches and `pair_out` never exists. At one or two tokens a program per token
leaves GEMM2 with too few programs (M × H/64), so GEMM2's `group_m` may split a token's
slots into parts, one program each: each part's float32 sum goes to a small buffer and
the token's last program to arrive (a counter per token and column tile, zeroed by
GEMM1) adds the parts in order — still deterministic, still no combine launch
(measured 1.05–1.19× faster on the layer at M = 1, H200; bench/NOTES.md). Chosen by
`ExpertsConfig.block_m` = `DIRECT_BLOCK_M`; the heuristic takes it where it measured faster.
"""

from __future__ import annotations

import torch

from moekit._direct_kernels import ROWS, _direct_gemm1_kernel, _direct_gemm2_kernel
from moekit._dot_precision import dot_precision
from moekit._intmath import cdiv, next_power_of_2, row_align
from moekit._launch import launcher


def launch_direct_experts(hidden, w13, w2, b13, b2, topk_ids, topk_weights, activation, alpha,
                          limit, weight_on_input, config, out) -> None:
    """Both direct launches; `config` is `ExpertsConfig.as_ints`'s flat form."""
    arrivals = gemm2_arrivals(topk_ids, w2.shape[1], config[6:11])
    inter = launch_direct_gemm1(hidden, w13, b13, topk_ids, topk_weights, activation, alpha,
                                limit, weight_on_input, config[1:6], arrivals)
    launch_direct_gemm2(inter, w2, b2, topk_ids, topk_weights, not weight_on_input,
                        config[6:11], out, arrivals)


def slot_parts(top_k: int, slots_per_program: int) -> tuple[int, int]:
    """GEMM2's split of a token's k slots: (slots one program sums, programs per token);
    `slots_per_program` is GEMM2's `group_m`, at most k counted, and at most 16: the fp8
    GEMM2 keeps each slot's product in a row of the dot's 16-row tile."""
    per_part = max(1, min(slots_per_program, top_k, ROWS.value))
    return per_part, cdiv(top_k, per_part)


def gemm2_parts(top_k: int, slots_per_program: int,
                out: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """`slot_parts`, and the float32 buffer [M*parts, H] of the parts' sums (`out`, never
    read, with one part)."""
    per_part, parts = slot_parts(top_k, slots_per_program)
    if parts == 1:
        return per_part, parts, out
    num_tokens, hidden_size = out.shape
    partials = torch.empty((num_tokens * parts, hidden_size), dtype=torch.float32,
                           device=out.device)
    return per_part, parts, partials


def gemm2_arrivals(topk_ids, hidden_size, tiles) -> torch.Tensor | None:
    """GEMM2's arrival counters [M, H-tiles] when its tiles split a token's slots over
    several programs (`_sum_parts`), else None; GEMM1 zeroes them."""
    num_tokens, top_k = topk_ids.shape
    if slot_parts(top_k, tiles[2])[1] == 1:
        return None
    return torch.empty((num_tokens, cdiv(hidden_size, tiles[0])), dtype=torch.int32,
                       device=topk_ids.device)


def launch_direct_gemm1(hidden, w13, b13, topk_ids, topk_weights, activation, alpha, limit,
                        weight_on_input, tiles, arrivals=None) -> torch.Tensor:
    """GEMM1 + activation of every pair; returns `inter` [M*k, I] in pair order, and
    zeroes `arrivals` (`gemm2_arrivals`) when given.

    `tiles` is (block_n, block_k, group_m, num_warps, num_stages); group_m is unused.
    """
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    gated = activation != "relu2"
    inter_size = w13.shape[1] // 2 if gated else w13.shape[1]
    block_n, block_k, _, warps, stages = tiles
    bias = topk_weights if b13 is None else b13  # a stand-in when absent; never read
    inter = torch.empty((num_tokens * top_k, inter_size), dtype=hidden.dtype,
                        device=hidden.device)
    launcher(_direct_gemm1_kernel)[(num_tokens * top_k, cdiv(inter_size, block_n))](
        hidden, w13, bias, topk_ids, topk_weights, inter,
        topk_ids if arrivals is None else arrivals, w13.shape[0], hidden_size, inter_size,
        top_k, 0 if arrivals is None else arrivals.shape[1], hidden.stride(0), w13.stride(0),
        w13.stride(1), 0 if b13 is None else b13.stride(0), inter.stride(0), float(alpha),
        float(limit),
        ACTIVATION=activation, GATED=gated, HAS_BIAS=b13 is not None,
        WEIGHT_ON_INPUT=weight_on_input, EVEN_K=hidden_size % block_k == 0,
        EVEN_N=inter_size % block_n == 0, DOT_PRECISION=dot_precision(hidden),
        CLEAR_ARRIVALS=arrivals is not None,
        ROW_ALIGN=row_align(hidden_size, inter_size, hidden.stride(0), w13.stride(0),
                            w13.stride(1), inter.stride(0)),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return inter


def launch_direct_gemm2(inter, w2, b2, topk_ids, topk_weights, weight_on_output, tiles,
                        out, arrivals=None) -> None:
    """GEMM2 (+bias, × router weight) of every token's k slots, summed into `out` [M, H].

    `tiles` is (block_n, block_k, slots per program, num_warps, num_stages); when that
    splits a token's slots over several programs, `arrivals` is `gemm2_arrivals`' buffer
    after GEMM1 zeroed it.
    """
    num_experts, hidden_size, inter_size = w2.shape
    num_tokens, top_k = topk_ids.shape
    block_n, block_k, slots_per_program, warps, stages = tiles
    per_part, parts, partials = gemm2_parts(top_k, slots_per_program, out)
    bias = topk_weights if b2 is None else b2  # a stand-in when absent; never read
    launcher(_direct_gemm2_kernel)[(num_tokens * parts, cdiv(hidden_size, block_n))](
        inter, w2, bias, topk_ids, topk_weights, out, partials,
        topk_ids if arrivals is None else arrivals, num_experts, hidden_size, inter_size,
        inter.stride(0), w2.stride(0), w2.stride(1), 0 if b2 is None else b2.stride(0),
        out.stride(0),
        WEIGHT_ON_OUTPUT=weight_on_output, HAS_BIAS=b2 is not None,
        EVEN_K=inter_size % block_k == 0, EVEN_N=hidden_size % block_n == 0,
        DOT_PRECISION=dot_precision(inter), TOP_K=top_k, SLOTS=next_power_of_2(top_k),
        PER_PART=per_part, PARTS=parts,
        ROW_ALIGN=row_align(hidden_size, inter_size, inter.stride(0), w2.stride(0),
                            w2.stride(1), out.stride(0)),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
