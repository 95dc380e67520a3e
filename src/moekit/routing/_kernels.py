"""Triton body of `route`: one launch from router logits to top-k ids and weights.

One program owns BLOCK_M token rows and loads each row once, viewed as a
[BLOCK_G, BLOCK_S] tile (n_group groups of E / n_group experts; one group when there
are no groups). In registers it then
    scores the row → ranks groups by their top-2 sum and keeps TOPK_GROUP of them →
    takes the k best experts one at a time (max, lowest id holding it, mask it out) →
    turns the chosen experts into weights (renormalise, scale) →
    stores ids + weights, or the packed (id << 16 | bf16 bits) int32.
Lanes outside the row (padding, dropped groups, already-chosen experts) carry key −inf
and the id sentinel _NO_ID, so a pick is always a real, unchosen expert even when every
key is −inf.
"""

import triton
import triton.language as tl

# Larger than any expert id, so a minimum over ids never picks it while a real id is left.
_NO_ID = tl.constexpr(1 << 30)


@triton.jit
def _bf16_bits(w):
    """Low 16 bits = bf16 bit pattern of fp32 `w`, rounded to nearest even; NaN → 0x7FC0.

    Integer arithmetic instead of a bf16 cast: the interpreter and torch's CPU kernels
    disagree with the GPU on NaN bit patterns, and this is exact everywhere.
    """
    bits = w.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(w != w, 0x7FC0, rounded.to(tl.int32))


# M is not specialised (Triton would compile M == 1 apart): one binary serves every batch.
@triton.jit(do_not_specialize=["M"])
def _route_kernel(
    logits_ptr,  # [M, E] fp32 / fp16 / bf16
    bias_ptr,  # [E] score-correction bias (read only when HAS_BIAS)
    ids_ptr,  # [M, TOP_K] int32, written unless PACKED
    weights_ptr,  # [M, TOP_K] fp32, written unless PACKED
    packed_ptr,  # [M, TOP_K] int32 (id << 16 | bf16 bits of the weight), written when PACKED
    M,
    stride_lm,
    stride_le,
    stride_b,
    routed_scaling_factor,
    SOFTMAX: tl.constexpr,  # scoring: softmax over E (else sigmoid)
    SOFTMAX_OVER_TOPK: tl.constexpr,  # weights = softmax over the k chosen logits
    SELECT_ON_LOGITS: tl.constexpr,  # rank by raw logits (no bias, no groups)
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    PACKED: tl.constexpr,
    TOP_K: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # E // N_GROUP
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,  # next_power_of_2(N_GROUP)
    BLOCK_S: tl.constexpr,  # next_power_of_2(GROUP_SIZE)
    BLOCK_K: tl.constexpr,  # next_power_of_2(TOP_K)
):
    """Grid: (cdiv(M, BLOCK_M),). One program routes rows [pid*BLOCK_M, (pid+1)*BLOCK_M)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    _route_rows(logits_ptr, bias_ptr, ids_ptr, weights_ptr, packed_ptr, rows, M, stride_lm,
                stride_le, stride_b, routed_scaling_factor, SOFTMAX, SOFTMAX_OVER_TOPK,
                SELECT_ON_LOGITS, HAS_BIAS, RENORMALIZE, PACKED, TOP_K, N_GROUP, TOPK_GROUP,
                GROUP_SIZE, BLOCK_G, BLOCK_S, BLOCK_K, "")


@triton.jit
def _route_rows(
    logits_ptr, bias_ptr, ids_ptr, weights_ptr, packed_ptr,  # as `_route_kernel`'s
    rows,  # [BM] the token rows this program routes (those ≥ M are masked)
    M, stride_lm, stride_le, stride_b, routed_scaling_factor,
    SOFTMAX: tl.constexpr, SOFTMAX_OVER_TOPK: tl.constexpr, SELECT_ON_LOGITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, PACKED: tl.constexpr,
    TOP_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOGITS_CACHE: tl.constexpr,  # the logits' load cache modifier: ".cg" when other
    # programs of the same launch wrote them (`moekit.routing._router_topk_kernel`)
):
    """Route `rows`: the module docstring's steps, in registers."""
    NEG_INF: tl.constexpr = float("-inf")
    BLOCK_M: tl.constexpr = rows.shape[0]
    row_ok = rows < M
    rows64 = rows.to(tl.int64)  # M * E may exceed 2**31
    g = tl.arange(0, BLOCK_G)
    s = tl.arange(0, BLOCK_S)
    lane_ok = (g[:, None] < N_GROUP) & (s[None, :] < GROUP_SIZE)  # [BG, BS]
    expert = g[:, None] * GROUP_SIZE + s[None, :]  # [BG, BS]

    ptrs = logits_ptr + rows64[:, None, None] * stride_lm + expert[None, :, :] * stride_le
    x = tl.load(ptrs, mask=row_ok[:, None, None] & lane_ok[None, :, :], other=NEG_INF,
                cache_modifier=LOGITS_CACHE)
    x = x.to(tl.float32)  # [BM, BG, BS]
    x = tl.where(x != x, NEG_INF, x)  # NaN ranks last, never out of range

    # ---- selection key (and the unbiased score the weight comes from) ----
    if SELECT_ON_LOGITS:
        key = x
        score = x  # unused: the weight is computed from the chosen logit below
    else:
        if SOFTMAX:
            row_max = tl.max(tl.max(x, axis=2), axis=1)  # [BM]
            e = tl.exp(x - row_max[:, None, None])
            score = e / tl.sum(tl.sum(e, axis=2), axis=1)[:, None, None]
        else:
            score = 1.0 / (1.0 + tl.exp(-x))
        key = score
        if HAS_BIAS:
            bias = tl.load(bias_ptr + expert * stride_b, mask=lane_ok, other=0.0)
            key = key + bias.to(tl.float32)[None, :, :]
        key = tl.where(key != key, NEG_INF, key)
    key = tl.where(lane_ok[None, :, :], key, NEG_INF)
    cand = tl.where(lane_ok, expert, _NO_ID)[None, :, :]  # [1, BG, BS] expert id or _NO_ID
    cand = tl.broadcast_to(cand, (BLOCK_M, BLOCK_G, BLOCK_S))

    # ---- keep the TOPK_GROUP groups with the largest top-2 key sums ----
    if N_GROUP > 1:
        top1 = tl.max(key, axis=2)  # [BM, BG]
        if GROUP_SIZE > 1:
            # Drop one occurrence of the max (the lowest lane), so tied maxima count twice.
            first = tl.min(tl.where(key == top1[:, :, None], s[None, None, :], BLOCK_S), axis=2)
            top2 = tl.max(tl.where(s[None, None, :] == first[:, :, None], NEG_INF, key), axis=2)
            group_score = top1 + top2
        else:
            group_score = top1
        group_ok = g[None, :] < N_GROUP
        group_score = tl.where((group_score != group_score) | ~group_ok, NEG_INF, group_score)
        group_id = tl.broadcast_to(tl.where(group_ok, g[None, :], _NO_ID), (BLOCK_M, BLOCK_G))
        keep = group_id < 0  # [BM, BG] all False
        for _ in tl.static_range(TOPK_GROUP):
            best_group = tl.max(group_score, axis=1)  # [BM]
            picked_group = tl.min(
                tl.where(group_score == best_group[:, None], group_id, _NO_ID), axis=1
            )
            is_picked = group_id == picked_group[:, None]  # [BM, BG]
            keep = keep | is_picked
            group_score = tl.where(is_picked, NEG_INF, group_score)
            group_id = tl.where(is_picked, _NO_ID, group_id)
        key = tl.where(keep[:, :, None], key, NEG_INF)
        cand = tl.where(keep[:, :, None], cand, _NO_ID)

    # ---- top-k: the best remaining key, the lowest expert id holding it ----
    slot = tl.arange(0, BLOCK_K)  # [BK]
    slot_ok = slot < TOP_K
    out_id = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
    out_val = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for j in range(TOP_K):
        best = tl.max(tl.max(key, axis=2), axis=1)  # [BM]
        pick = tl.min(tl.min(tl.where(key == best[:, None, None], cand, _NO_ID), axis=2), axis=1)
        hit = cand == pick[:, None, None]  # [BM, BG, BS], one lane per row
        if SELECT_ON_LOGITS:
            val = best
        else:
            # A sum, not a max, so that a NaN score survives on every backend.
            val = tl.sum(tl.sum(tl.where(hit, score, 0.0), axis=2), axis=1)
        key = tl.where(hit, NEG_INF, key)
        cand = tl.where(hit, _NO_ID, cand)
        out_id = tl.where(slot[None, :] == j, pick[:, None], out_id)
        out_val = tl.where(slot[None, :] == j, val[:, None], out_val)

    # ---- weights ----
    if SOFTMAX_OVER_TOPK:
        top = tl.max(tl.where(slot_ok[None, :], out_val, NEG_INF), axis=1)  # the 1st pick
        e = tl.where(slot_ok[None, :], tl.exp(out_val - top[:, None]), 0.0)
        w = e / tl.sum(e, axis=1)[:, None]
    elif SELECT_ON_LOGITS:
        if SOFTMAX:
            row_max = tl.max(tl.where(slot_ok[None, :], out_val, NEG_INF), axis=1)
            denom = tl.sum(tl.sum(tl.exp(x - row_max[:, None, None]), axis=2), axis=1)
            w = tl.exp(out_val - row_max[:, None]) / denom[:, None]
        else:
            w = 1.0 / (1.0 + tl.exp(-out_val))
    else:
        w = out_val
    if RENORMALIZE:
        w = w / (tl.sum(tl.where(slot_ok[None, :], w, 0.0), axis=1)[:, None] + 1e-20)
    w = w * routed_scaling_factor

    offs = rows64[:, None] * TOP_K + slot[None, :]  # [BM, BK]
    mask = row_ok[:, None] & slot_ok[None, :]
    if PACKED:
        tl.store(packed_ptr + offs, (out_id << 16) | _bf16_bits(w), mask=mask)
    else:
        tl.store(ids_ptr + offs, out_id, mask=mask)
        tl.store(weights_ptr + offs, w, mask=mask)
