"""Synthetic inputs of the kernel table: weights, tokens and routing, never zeros.

Weights are drawn once per preset straight on the device (a 22 GB deepseek-v3 layer
is too slow to build on the host and copy), scaled by 1/sqrt(fan_in) so activations
stay O(1) through both GEMMs and every output is finite. Tokens and routing are drawn
per token count from seeds that depend only on (seed, M), so a cell's inputs do not
depend on which other cells ran before it.

Routing (PERF.md): softmax over random logits, top-k, renormalised. `balanced` uses
plain N(0, 1) logits (near-uniform load); `skewed` adds a fixed per-expert offset
−2·log(1 + rank) with a random expert ranking, so a handful of experts take most pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit import reference
from moekit.bench.presets import Preset
from moekit.topk import TopK

ROUTINGS = ("balanced", "skewed")
SKEW_STRENGTH = 2.0
BIAS_STD = 0.1


@dataclass
class ExpertWeights:
    """One preset's expert weights: w13 [E, rows13, H], w2 [E, H, I], optional biases."""

    w13: torch.Tensor
    w2: torch.Tensor
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def make_weights(preset: Preset, dtype: torch.dtype, device: torch.device,
                 seed: int = 0) -> ExpertWeights:
    """Random normal expert weights scaled by 1/sqrt(fan_in), drawn on `device`.

    Returns:
        ExpertWeights; biases ([E, rows13] and [E, H], std 0.1) only if `preset.bias`.
    """
    gen = _generator(device, seed)
    e, h, i, rows = preset.num_experts, preset.hidden, preset.inter, preset.gemm1_rows
    w13 = torch.empty((e, rows, h), dtype=dtype, device=device).normal_(0, h**-0.5, generator=gen)
    w2 = torch.empty((e, h, i), dtype=dtype, device=device).normal_(0, i**-0.5, generator=gen)
    if not preset.bias:
        return ExpertWeights(w13, w2)
    b13 = torch.empty((e, rows), dtype=dtype, device=device).normal_(0, BIAS_STD, generator=gen)
    b2 = torch.empty((e, h), dtype=dtype, device=device).normal_(0, BIAS_STD, generator=gen)
    return ExpertWeights(w13, w2, b13, b2)


def skew_offsets(num_experts: int, seed: int = 0) -> torch.Tensor:
    """Per-expert logit offsets −2·log(1 + rank) for a seeded random ranking; float32 [E]."""
    gen = _generator(torch.device("cpu"), seed + 7919)
    rank = torch.empty(num_experts, dtype=torch.float32)
    rank[torch.randperm(num_experts, generator=gen)] = torch.arange(num_experts,
                                                                      dtype=torch.float32)
    return -SKEW_STRENGTH * torch.log1p(rank)


def make_tokens(preset: Preset, num_tokens: int, dtype: torch.dtype, device: torch.device,
                routing: str = "balanced", seed: int = 0) -> tuple[torch.Tensor, TopK]:
    """Hidden states N(0, 1) [M, H] and their top-k routing (ids int32, weights fp32 [M, k])."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing: expected one of {ROUTINGS}, got {routing!r}")
    gen = _generator(device, seed * 1_000_003 + num_tokens)
    hidden = torch.empty((num_tokens, preset.hidden), dtype=dtype, device=device)
    hidden.normal_(0, 1, generator=gen)
    logits = torch.empty((num_tokens, preset.num_experts), dtype=torch.float32, device=device)
    logits.normal_(0, 1, generator=gen)
    if routing == "skewed":
        logits += skew_offsets(preset.num_experts, seed).to(device)
    return hidden, reference.route(logits, preset.top_k, renormalize=True)


def experts_hit(topk_ids: torch.Tensor, num_experts: int) -> int:
    """Distinct experts in [0, E) used by at least one pair (synchronises; not timed)."""
    ids = topk_ids[(topk_ids >= 0) & (topk_ids < num_experts)]
    return int(torch.unique(ids).numel())


def reference_rows(num_tokens: int, max_rows: int, seed: int = 0) -> torch.Tensor | None:
    """Token rows the reference checks: None (all) when M ≤ max_rows, else a sorted sample.

    The experts computation is row-independent, so checking a random subset of rows
    against the float32 reference measures the same error at a fraction of the cost.
    """
    if num_tokens <= max_rows:
        return None
    gen = _generator(torch.device("cpu"), seed + num_tokens)
    return torch.randperm(num_tokens, generator=gen)[:max_rows].sort().values


def reference_output(hidden: torch.Tensor, weights: ExpertWeights, topk: TopK,
                     activation: str, rows: torch.Tensor | None) -> torch.Tensor:
    """`moekit.reference.fused_experts` in float32 on `rows` of the batch (all when None).

    Returns:
        float32 [len(rows) or M, H]. TF32 is switched off for the duration so the
        reference is a true float32 product.
    """
    ids, wts = topk.ids, topk.weights
    if rows is not None:
        rows = rows.to(hidden.device)
        hidden, ids, wts = hidden[rows], ids[rows], wts[rows]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return reference.fused_experts(
            hidden.float(), weights.w13, weights.w2, ids, wts, activation=activation,
            b13=weights.b13, b2=weights.b2,
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def rel_err(out: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor | None) -> float:
    """‖out[rows] − ref‖₂ / ‖ref‖₂ computed in float64 (inf if out has non-finite values)."""
    if rows is not None:
        out = out[rows.to(out.device)]
    a, e = out.double(), ref.double()
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    denom = float(e.norm())
    diff = float((a - e).norm())
    return diff / denom if denom > 0 else diff
