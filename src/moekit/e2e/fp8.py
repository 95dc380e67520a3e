"""`moekit run --fp8-experts`: the model's experts as a fine-grained fp8 checkpoint holds them.

transformers loads DeepSeek-V3-style fp8 checkpoints (e4m3 weights, `*_scale_inv` per
128×128 block) into `FP8Experts` modules, which moekit serves through
`FP8ExpertsInterface` (`moekit.integrations.fp8_experts_layout`). `moekit run` has no
checkpoint — its weights are random — so it makes those modules from the model's bf16
experts as `moekit.integrations.fp8_quantize` does (transformers' own checkpoint
quantiser, 128×128 blocks; at tiny widths the largest power-of-two block of at least 16
that divides H and I).

Unlike `quantize_experts`, the bf16 modules stay beside the fp8 ones
(`Fp8ExpertsSwap.use`): the baseline runs
transformers' bf16 experts and moekit the fp8 ones, so the speedup is that of serving
the fp8 checkpoint with moekit over the bf16 model with transformers (transformers' own
fp8 experts load a kernel from the Hugging Face Hub, so they cannot be the baseline
offline). gpt-oss is refused: its experts have biases, which `FP8Experts` does not hold.

The check of an fp8 run needs the plainest implementation of the same fp8 model, which
transformers cannot give offline either: `REFERENCE` is an experts implementation that
runs `moekit.reference.fused_experts_quantized` on the module's fp8 weights (activations
quantised in the same 1×block groups), registered in transformers' fp8 registry by
`register_reference`. In the bf16 model it gives the check its noise; in the model upcast
to float32 (the fp8 values stay, their scales are float32 already), its oracle.
"""

from __future__ import annotations

import torch

from moekit.integrations.fp8_quantize import experts_slots, fp8_experts_like

REFERENCE = "moekit-fp8-reference"


def register_reference() -> None:
    """Register `REFERENCE` in transformers' fp8 experts registry (idempotent)."""
    from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface

    FP8ExpertsInterface.register(REFERENCE, reference_forward)


def reference_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """An fp8 experts module's forward by `moekit.reference.fused_experts_quantized`, in
    hidden's dtype (float32 inside); arguments as `fp8_experts_forward`'s.

    Raises:
        ValueError: for a module moekit does not serve (no reference for it either).
    """
    from moekit import reference
    from moekit.integrations.fp8_experts_layout import fp8_experts_operands, fp8_experts_plan

    plan = fp8_experts_plan(self)
    if not plan.supported:
        raise ValueError(f"{REFERENCE}: {type(self).__name__}: {plan.reason}")
    ops = fp8_experts_operands(self, plan)
    # int64 ids and any float weights as they come; ids outside [0, E) contribute nothing.
    return reference.fused_experts_quantized(
        hidden_states, ops.w13, ops.w2, top_k_index, top_k_weights, scheme=plan.scheme,
        activation=plan.activation)


class Fp8ExpertsSwap:
    """Every experts module of a model and its fp8 twin; `use` puts one set in place."""

    def __init__(self, model: torch.nn.Module, block: int) -> None:
        self.block = block
        self._slots = [(parent, attr, module, fp8_experts_like(module, block))  # bf16, fp8
                       for _, parent, attr, module in experts_slots(model)]

    def __len__(self) -> int:
        return len(self._slots)

    def use(self, fp8: bool) -> None:
        """Put the fp8 modules (True) or the model's own bf16 ones (False) in place."""
        for parent, attr, bf16_module, fp8_module in self._slots:
            setattr(parent, attr, fp8_module if fp8 else bf16_module)

    def fp8_bytes(self) -> int:
        """Bytes of the fp8 modules' weights and scales."""
        return sum(p.numel() * p.element_size() for *_, m in self._slots for p in m.parameters())
