"""Reference dispatch plan: token–expert pairs grouped by expert, padded to blocks."""

from __future__ import annotations

import torch

from moekit.dispatch_plan import DispatchPlan, max_padded_pairs


def dispatch_plan(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> DispatchPlan:
    """Group the flattened pairs (index m*k + j) by expert, in pair order within an expert.

    Each expert's run is padded with the sentinel M*k to a multiple of `block_m`; ids
    outside [0, E) are dropped. Slots past the last expert's run hold the sentinel, and
    blocks there hold expert −1, so the shapes depend only on (M*k, E, block_m).
    """
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    capacity = max_padded_pairs(num_pairs, num_experts, block_m)
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int32)
    block_experts = torch.full((capacity // block_m,), -1, dtype=torch.int32)
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int32)
    pos = 0
    for e in range(num_experts):
        pairs = torch.nonzero(flat.cpu() == e).flatten()
        n = pairs.numel()
        padded = -(-n // block_m) * block_m
        sorted_pairs[pos : pos + n] = pairs.to(torch.int32)
        block_experts[pos // block_m : (pos + padded) // block_m] = e
        pos += padded
        expert_offsets[e + 1] = pos
    device = topk_ids.device
    return DispatchPlan(
        sorted_pairs=sorted_pairs.to(device),
        block_experts=block_experts.to(device),
        expert_offsets=expert_offsets.to(device),
        num_pairs=num_pairs,
        block_m=block_m,
    )
