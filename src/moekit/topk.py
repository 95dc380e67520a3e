"""The routing result every stage agrees on: which experts each token uses, and how much.

`ids` is int32 [M, k]; `weights` is float32 [M, k]. An id outside [0, E) (−1 by
convention, or a sentinel ≥ E from expert parallelism) means "no expert": that slot
contributes nothing to the output.

The packed form (TensorRT-LLM's routed-MoE input) holds one (token, slot) in one int32:
`(id << 16) | b`, where b is the bf16 bit pattern of the weight (round to nearest even,
NaN → 0x7FC0) taken as an unsigned 16-bit value, so a negative weight never sign-extends
into the id. Ids in [−2**15, 2**15) survive the round trip (the arithmetic shift of
unpacking restores −1); weights come back rounded to bf16.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TopK(NamedTuple):
    """Top-k routing of M tokens: `ids` int32 [M, k], `weights` float32 [M, k]."""

    ids: torch.Tensor
    weights: torch.Tensor


def bf16_bits(weights: torch.Tensor) -> torch.Tensor:
    """Bit patterns of `weights` rounded to bf16, as int32 in [0, 2**16).

    Integer rounding rather than `.to(torch.bfloat16)`, whose NaN pattern differs between
    torch's CPU (0xFFFF) and CUDA kernels; this matches the routing kernel bit for bit.

    Args:
        weights: float32 [...].
    Returns:
        int32 [...].
    """
    bits = weights.float().contiguous().view(torch.int32)
    # int32 wrap-around only happens for NaN payloads, which are replaced below.
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    return torch.where(torch.isnan(weights), 0x7FC0, rounded)


def pack_topk(topk: TopK) -> torch.Tensor:
    """Pack ids and weights into one int32 per (token, slot).

    Args:
        topk: ids integer [M, k] in [−2**15, 2**15), weights float [M, k].
    Returns:
        int32 [M, k]: `(id << 16) | bf16_bits(weight)`.
    """
    return (topk.ids.to(torch.int32) << 16) | bf16_bits(topk.weights)


def unpack_topk(packed: torch.Tensor) -> TopK:
    """Inverse of `pack_topk`.

    Args:
        packed: int32 [M, k].
    Returns:
        TopK with ids int32 [M, k] and weights float32 [M, k] (bf16-exact values).
    """
    if packed.dtype != torch.int32:
        raise TypeError(f"packed: expected dtype int32, got {packed.dtype}")
    ids = packed >> 16  # arithmetic shift: −1 comes back as −1
    # A bf16 pattern in the high half of an int32 is that value as float32.
    weights = (packed << 16).view(torch.float32)
    return TopK(ids, weights)
