"""Two plain-PyTorch implementations of `fused_experts`, the yardsticks of the table.

Both compute the same math as `moekit.reference.fused_experts` on the same inputs, in
the inputs' dtype (float32 accumulation of the k slots), with the activation taken
from `moekit.reference.apply_activation`. They assume ids in [0, E), which the bench
routing guarantees.

- `torch_loop`: what transformers' eager MoE does — a one-hot mask per expert, a host
  round trip to find the experts hit, then per expert: gather its tokens, two
  matmuls with the activation between, scale by the router weight, `index_add_` into
  the output. Launch-bound at small M and it synchronises, so it cannot be captured
  in a CUDA graph.
- `torch_grouped_mm`: sort the (token, slot) pairs by expert, gather rows, and run
  both GEMMs as one `torch._grouped_mm` each over per-expert row groups (end offsets
  as int32 cumsum on the device), then weight and scatter-add. No host sync: on sm90+
  in bf16 it is capturable. (`torch._grouped_mm` takes A [T, K] 2-d, B [G, K, N] 3-d
  with 16-byte aligned strides — the transposed weight views qualify — and `offs`
  int32 [G]; on CUDA only bf16 gets the fused kernel, other dtypes fall back to a
  per-group loop with a host copy of `offs`.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekit.reference import apply_activation


def torch_loop(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
               activation: str = "silu", b13: torch.Tensor | None = None,
               b2: torch.Tensor | None = None) -> torch.Tensor:
    """Per-expert loop (transformers' eager MoE).

    Args:
        hidden: [M, H]. w13: [E, rows13, H]. w2: [E, H, I]. topk_ids: [M, k] int.
        topk_weights: [M, k] float. b13: optional [E, rows13]. b2: optional [E, H].
    Returns:
        [M, H] in hidden's dtype.
    """
    num_experts = w13.shape[0]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # [M, H]
    mask = torch.nn.functional.one_hot(topk_ids.long(), num_experts).permute(2, 1, 0)  # [E, k, M]
    hit = torch.nonzero(mask.sum(dim=(1, 2)) > 0).flatten().tolist()  # host sync
    for e in hit:
        slots, tokens = torch.where(mask[e])
        x = hidden.index_select(0, tokens)  # [n, H]
        h = x @ w13[e].T  # [n, rows13]
        if b13 is not None:
            h = h + b13[e]
        y = apply_activation(h, activation) @ w2[e].T  # [n, H]
        if b2 is not None:
            y = y + b2[e]
        out.index_add_(0, tokens, y.float() * topk_weights[tokens, slots].unsqueeze(1))
    return out.to(hidden.dtype)


class GroupedLayout(NamedTuple):
    """Pairs (p = m·k + j) sorted by expert, stable within an expert.

    order   int64 [M·k]  pair index at each sorted position
    tokens  int64 [M·k]  token m of each sorted pair
    experts int64 [M·k]  expert of each sorted pair (non-decreasing)
    offs    int32 [E]    end of each expert's rows: offs[e] = #pairs with expert ≤ e
    """

    order: torch.Tensor
    tokens: torch.Tensor
    experts: torch.Tensor
    offs: torch.Tensor


def grouped_layout(topk_ids: torch.Tensor, num_experts: int) -> GroupedLayout:
    """Group the pairs by expert on the device, without a host sync (graph-capturable).

    Args:
        topk_ids: [M, k] integer ids in [0, E).
    Returns:
        GroupedLayout (see its docstring).
    """
    top_k = topk_ids.shape[1]
    experts, order = torch.sort(topk_ids.reshape(-1).long(), stable=True)  # [M*k]
    bounds = torch.arange(num_experts, device=topk_ids.device)  # [E]
    offs = torch.searchsorted(experts, bounds, right=True, out_int32=True)  # [E]
    return GroupedLayout(order, order // top_k, experts, offs)


def torch_grouped_mm(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                     activation: str = "silu", b13: torch.Tensor | None = None,
                     b2: torch.Tensor | None = None) -> torch.Tensor:
    """Sort by expert, two `torch._grouped_mm` GEMMs, weight and scatter-add.

    Args and Returns as `torch_loop`.
    """
    layout = grouped_layout(topk_ids, w13.shape[0])
    x = hidden.index_select(0, layout.tokens)  # [M*k, H]
    h = torch._grouped_mm(x, w13.transpose(-2, -1), offs=layout.offs)  # [M*k, rows13]
    if b13 is not None:
        h = h + b13.index_select(0, layout.experts)
    a = apply_activation(h, activation).contiguous()  # [M*k, I]
    y = torch._grouped_mm(a, w2.transpose(-2, -1), offs=layout.offs)  # [M*k, H]
    if b2 is not None:
        y = y + b2.index_select(0, layout.experts)
    scale = topk_weights.reshape(-1).index_select(0, layout.order).unsqueeze(1)  # [M*k, 1]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # [M, H]
    out.index_add_(0, layout.tokens, y.float() * scale)
    return out.to(hidden.dtype)


BASELINES = {"torch_loop": torch_loop, "torch_grouped_mm": torch_grouped_mm}
