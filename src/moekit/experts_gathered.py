"""The gathered experts path: the plan path's tiles at decode, without the plan or combine.

    hidden [M, H] ─► _gathered_gemm1_kernel: per (row step, I-tile), ≤ block_m rows of one
                     expert found in topk_ids × w13[e]ᵀ (+b13), activation ─► inter [M*k, I]
                  ─► _gathered_gemm2_kernel: per (row step, H-tile), inter rows × w2[e]ᵀ
                     (+b2) × weight ─► pair_out [M*k, H]; each token's rows summed in slot
                     order by the program that stores its last one          ─► out [M, H]

Between the direct path (one row a program, for up to a few tokens) and the plan path
(experts' rows in plan order), for 8–64 tokens: each program takes up to `block_m` rows of
one expert as the plan path's tiles do, but finds them in `topk_ids` itself, and GEMM2
does the combine's sums; two launches instead of four, and no cast of the ids or weights.
The output equals the plan path's at the same tiles, bitwise.
Chosen by `ExpertsConfig.gathered`.
"""

from __future__ import annotations

import torch

from moekit._dot_precision import dot_precision
from moekit._gathered_kernels import _gathered_gemm1_kernel, _gathered_gemm2_kernel
from moekit._intmath import cdiv, next_power_of_2, row_align
from moekit._launch import launcher


def launch_gathered_experts(hidden, w13, w2, b13, b2, topk_ids, topk_weights, activation, alpha,
                            limit, weight_on_input, config, out) -> None:
    """Both gathered launches; `config` is `ExpertsConfig.as_ints`'s flat form."""
    block_m = config[0]
    arrivals = gemm2_arrivals(topk_ids.shape[0], w2.shape[1], config[6], hidden.device)
    inter = launch_gathered_gemm1(hidden, w13, b13, topk_ids, topk_weights, activation, alpha,
                                  limit, weight_on_input, block_m, config[1:6], arrivals)
    launch_gathered_gemm2(inter, w2, b2, topk_ids, topk_weights, not weight_on_input, block_m,
                          config[6:11], out, arrivals)


def gemm2_arrivals(num_tokens: int, hidden_size: int, block_n: int,
                   device: torch.device) -> torch.Tensor:
    """GEMM2's arrival counters [M, H-tiles] (`_sum_finished_tokens`); GEMM1 zeroes them."""
    return torch.empty((num_tokens, cdiv(hidden_size, block_n)), dtype=torch.int32,
                       device=device)


def row_steps_bound(num_tokens: int, top_k: int, num_experts: int, block_m: int) -> int:
    """The most row steps (`_program_step`: an expert's pairs block_m at a time) M·k pairs
    can make: each expert hit takes one plus one per block_m pairs past its first, so at
    most min(E, M·k) + M·k // block_m. Each GEMM's grid has this many rows of programs
    (those past the last step exit at once)."""
    pairs = num_tokens * top_k
    return min(num_experts, pairs) + pairs // block_m


def pairs_bound(num_pairs: int, block_m: int) -> int:
    """The kernels' PAIRS: M·k rounded up to a power of two, and to at least one row step
    (so `_rows_of`'s chunks of ids, powers of two, divide it)."""
    return max(next_power_of_2(num_pairs), block_m)


def launch_gathered_gemm1(hidden, w13, b13, topk_ids, topk_weights, activation, alpha, limit,
                          weight_on_input, block_m, tiles, arrivals) -> torch.Tensor:
    """GEMM1 + activation of every pair; returns `inter` [M*k, I] in pair order and zeroes
    `arrivals`. `tiles` is (block_n, block_k, group_m, num_warps, num_stages); group_m is
    unused."""
    num_tokens, hidden_size = hidden.shape
    num_experts = w13.shape[0]
    top_k = topk_ids.shape[1]
    gated = activation != "relu2"
    inter_size = w13.shape[1] // 2 if gated else w13.shape[1]
    block_n, block_k, _, warps, stages = tiles
    bias = topk_weights if b13 is None else b13  # a stand-in when absent; never read
    inter = torch.empty((num_tokens * top_k, inter_size), dtype=hidden.dtype,
                        device=hidden.device)
    grid = row_steps_bound(num_tokens, top_k, num_experts, block_m) * cdiv(inter_size, block_n)
    launcher(_gathered_gemm1_kernel)[(grid,)](
        hidden, w13, bias, topk_ids, topk_weights, inter, arrivals, num_experts,
        num_tokens * top_k, hidden_size, inter_size, top_k, arrivals.numel(), hidden.stride(0),
        w13.stride(0), w13.stride(1), 0 if b13 is None else b13.stride(0), inter.stride(0),
        float(alpha), float(limit),
        ACTIVATION=activation, GATED=gated, HAS_BIAS=b13 is not None,
        WEIGHT_ON_INPUT=weight_on_input, EVEN_K=hidden_size % block_k == 0,
        EVEN_N=inter_size % block_n == 0, DOT_PRECISION=dot_precision(hidden),
        ROW_ALIGN=row_align(hidden_size, inter_size, hidden.stride(0), w13.stride(0),
                            w13.stride(1), inter.stride(0)),
        PAIRS=pairs_bound(num_tokens * top_k, block_m), EXPERTS=next_power_of_2(num_experts),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return inter


def launch_gathered_gemm2(inter, w2, b2, topk_ids, topk_weights, weight_on_output, block_m,
                          tiles, out, arrivals) -> None:
    """GEMM2 (+bias, × router weight) of every pair, and each token's slots summed into
    `out` [M, H]; `arrivals` [M, H-tiles] as GEMM1 left them (zeros)."""
    num_experts, hidden_size, inter_size = w2.shape
    num_tokens, top_k = topk_ids.shape
    block_n, block_k, _, warps, stages = tiles
    bias = topk_weights if b2 is None else b2  # a stand-in when absent; never read
    pair_out = torch.empty((num_tokens * top_k, hidden_size), dtype=inter.dtype,
                           device=inter.device)
    grid = row_steps_bound(num_tokens, top_k, num_experts, block_m) * cdiv(hidden_size, block_n)
    launcher(_gathered_gemm2_kernel)[(grid,)](
        inter, w2, bias, topk_ids, topk_weights, pair_out, out, arrivals, num_experts,
        num_tokens, hidden_size, inter_size, inter.stride(0), w2.stride(0), w2.stride(1),
        0 if b2 is None else b2.stride(0), pair_out.stride(0), out.stride(0),
        WEIGHT_ON_OUTPUT=weight_on_output, HAS_BIAS=b2 is not None,
        EVEN_K=inter_size % block_k == 0, EVEN_N=hidden_size % block_n == 0,
        DOT_PRECISION=dot_precision(inter),
        ROW_ALIGN=row_align(hidden_size, inter_size, inter.stride(0), w2.stride(0),
                            w2.stride(1), pair_out.stride(0), out.stride(0)),
        TOP_K=top_k, SLOTS=next_power_of_2(top_k), PAIRS=pairs_bound(num_tokens * top_k, block_m),
        EXPERTS=next_power_of_2(num_experts), TOKENS=next_power_of_2(num_tokens),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
