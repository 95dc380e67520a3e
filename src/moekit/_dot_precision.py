"""The `input_precision` of the experts GEMMs' dots, shared by the plan and direct paths."""

from __future__ import annotations

import torch


def dot_precision(t: torch.Tensor) -> str | None:
    """fp32 inputs take exact fp32 dots (no TF32); 16-bit ones the default."""
    return "ieee" if t.dtype == torch.float32 else None
