"""Reference permute/unpermute over the plan's grouped layout (see `moekit.permute`).

Written from the plan's definition alone: the slot of each pair is recovered by
inverting `sorted_pairs` here, not read from the plan's `pair_slots`, so a test against
this reference also checks the inverse map the plan builder writes.
"""

from __future__ import annotations

import torch

from moekit.dispatch_plan import DispatchPlan

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def permute(
    hidden: torch.Tensor,
    plan: DispatchPlan,
    *,
    top_k: int,
    row_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """grouped[s] = hidden[sorted_pairs[s] // k] for real slots; zeros elsewhere.

    Args:
        hidden: [M, H] of any float dtype (moved as bits, so fp8 works too).
        plan: a `DispatchPlan` with num_pairs = M·top_k.
        top_k: k.
        row_scales: optional float [M] or [M, G], moved with the rows.
    Returns:
        (grouped [capacity, H] in hidden's dtype, grouped_scales [capacity] or
        [capacity, G] float32, or None). Every non-pair slot — padding and the unused
        tail alike — is zero here; the fast path leaves the tail unwritten.
    """
    device = hidden.device
    bits = hidden.view(_BITS[hidden.element_size()])  # a copy is a copy: index the bits
    pairs = plan.sorted_pairs.long().to(device)
    real = pairs < plan.num_pairs
    tokens = pairs[real] // top_k
    grouped = torch.zeros((plan.capacity, hidden.shape[1]), dtype=bits.dtype, device=device)
    grouped[real] = bits[tokens]
    scales = None
    if row_scales is not None:
        scales = torch.zeros((plan.capacity, *row_scales.shape[1:]), dtype=torch.float32,
                             device=device)
        scales[real] = row_scales[tokens].float()
    return grouped.view(hidden.dtype), scales


def pair_slots(plan: DispatchPlan) -> torch.Tensor:
    """The inverse of `sorted_pairs`: int64 [M*k], the slot of each pair or −1 if dropped."""
    pairs = plan.sorted_pairs.long()
    real = pairs < plan.num_pairs
    slots = torch.full((plan.num_pairs,), -1, dtype=torch.long, device=pairs.device)
    slots[pairs[real]] = torch.nonzero(real).flatten()
    return slots


def unpermute(
    grouped: torch.Tensor, plan: DispatchPlan, topk_weights: torch.Tensor
) -> torch.Tensor:
    """out[m] = Σ_j w[m, j] · grouped[slot of pair m*k + j], over pairs that have a slot.

    Summed in order j = 0..k−1 in float32 (float64 for float64 input), like the kernel.

    Args:
        grouped: [capacity, H] float rows in the plan's layout.
        plan: the plan that laid them out.
        topk_weights: [M, k] float, M·k = plan.num_pairs.
    Returns:
        [M, H] in grouped's dtype.
    """
    num_tokens, top_k = topk_weights.shape
    acc_dtype = torch.float64 if grouped.dtype == torch.float64 else torch.float32
    slots = pair_slots(plan).to(grouped.device).view(num_tokens, top_k)
    weights = topk_weights.to(device=grouped.device, dtype=acc_dtype)
    out = torch.zeros((num_tokens, grouped.shape[1]), dtype=acc_dtype, device=grouped.device)
    for j in range(top_k):
        valid = slots[:, j] >= 0
        rows = grouped[slots[:, j].clamp(min=0)].to(acc_dtype)  # [M, H]
        # where, not a multiply by 0: a dropped pair's weight or row may be NaN.
        out += torch.where(valid[:, None], weights[:, j, None] * rows, 0.0)
    return out.to(grouped.dtype)
