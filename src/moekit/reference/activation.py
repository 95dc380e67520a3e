"""Reference formulas of the expert activations (see `moekit.activation`)."""

from __future__ import annotations

import torch

from moekit.activation import Activation


def apply_activation(h: torch.Tensor, activation: str | Activation) -> torch.Tensor:
    """Apply the activation to GEMM1's output.

    Args:
        h: [..., 2I] (gate columns first, then up) for gated activations, [..., I] for relu2.
        activation: an `Activation` or its name.
    Returns:
        [..., I] in h's dtype.
    """
    act = Activation.parse(activation)
    if not act.gated:
        return torch.relu(h).square()
    gate, up = h.chunk(2, dim=-1)
    if act.kind == "silu":
        return torch.nn.functional.silu(gate) * up
    if act.kind == "gelu":
        return torch.nn.functional.gelu(gate) * up
    if act.kind == "gelu_tanh":
        return torch.nn.functional.gelu(gate, approximate="tanh") * up
    gate = gate.clamp(max=act.limit)
    up = up.clamp(min=-act.limit, max=act.limit)
    return (up + 1) * gate * torch.sigmoid(act.alpha * gate)
