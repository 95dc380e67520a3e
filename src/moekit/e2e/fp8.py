"""`moekit run --fp8-experts`: the model's experts as a fine-grained fp8 checkpoint holds them.

transformers loads DeepSeek-V3-style fp8 checkpoints (e4m3 weights, `*_scale_inv` per
128×128 block) into `FP8Experts` modules, which moekit serves through
`FP8ExpertsInterface` (`moekit.integrations.fp8_experts_layout`). `moekit run` has no
checkpoint — its weights are random — so it makes those modules from the model's bf16
experts with transformers' own checkpoint quantiser (`Fp8Quantize`), expert by expert
(no float32 copy of a whole layer), in 128×128 blocks (at tiny widths, the largest
power-of-two block of at least 16 that divides H and I).

The bf16 modules stay beside the fp8 ones (`Fp8ExpertsSwap.use`): the baseline runs
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

import functools
import types

import torch

# The block of real checkpoints, and the smallest K group moekit's kernels take.
CHECKPOINT_BLOCK = 128
MIN_BLOCK = 16


def fp8_block(hidden: int, inter: int) -> int:
    """The largest power of two ≤ CHECKPOINT_BLOCK dividing both H and I.

    Raises:
        ValueError: when it would be below MIN_BLOCK.
    """
    block = CHECKPOINT_BLOCK
    while block >= MIN_BLOCK and (hidden % block or inter % block):
        block //= 2
    if block < MIN_BLOCK:
        raise ValueError(f"--fp8-experts: H = {hidden} and I = {inter} share no power-of-two "
                         f"block of at least {MIN_BLOCK}")
    return block


@functools.cache
def _fp8_experts_class(has_gate: bool) -> type[torch.nn.Module]:
    """transformers' `FP8Experts`, decorated as its fp8 loader decorates it (on a subclass,
    so the library's class stays as it is)."""
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts
    from transformers.integrations.moe import use_experts_implementation

    cls = type("RunFP8Experts", (FP8Experts,), {})
    return use_experts_implementation(experts_class=cls,
                                      experts_interface=ALL_FP8_EXPERTS_FUNCTIONS,
                                      has_gate=has_gate)


def _quantizer(block: int):
    """transformers' checkpoint quantiser for `block` × `block` tiles, float32 scales."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = types.SimpleNamespace(weight_block_size=(block, block), scale_fmt="float")
    quantizer = Fp8Quantize(types.SimpleNamespace(quantization_config=config))
    if not hasattr(quantizer, "_quantize_one"):
        raise RuntimeError("--fp8-experts: this transformers' Fp8Quantize has no _quantize_one "
                           "(known in 5.17–5.25)")
    return quantizer


@torch.no_grad()
def fp8_experts_like(module: torch.nn.Module, block: int) -> torch.nn.Module:
    """An `FP8Experts` module holding `module`'s bf16 experts quantised as a checkpoint would.

    Args:
        module: a transformers experts module stored [E, out, in], gate rows first, no biases.
        block: the square block of the weight scales.
    Raises:
        ValueError: for experts `FP8Experts` cannot hold (biases, transposed or interleaved).
    """
    name = type(module).__name__
    if getattr(module, "has_bias", False):
        raise ValueError(f"--fp8-experts: {name} has expert biases, which transformers' fp8 "
                         "experts do not hold")
    if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True):
        raise ValueError(f"--fp8-experts: {name} is not stored [E, out, in] with gate rows first")
    gated = bool(getattr(module, "has_gate", True))
    first = "gate_up_proj" if gated else "up_proj"
    device = getattr(module, first).device
    with torch.device(device):
        fp8 = _fp8_experts_class(gated)(module.config, block_size=(block, block))
    quantizer = _quantizer(block)
    for proj in (first, "down_proj"):
        source, target = getattr(module, proj), getattr(fp8, proj)
        scales = getattr(fp8, proj + "_scale_inv")
        if source.shape != target.shape:
            raise ValueError(f"--fp8-experts: {name}.{proj} is {tuple(source.shape)}, the fp8 "
                             f"module's {tuple(target.shape)}")
        for expert in range(source.shape[0]):  # one [N, K] at a time: a small float32 copy
            made = quantizer._quantize_one(proj, source[expert])
            target[expert].copy_(made[proj])
            scales[expert].copy_(made[proj + "_scale_inv"])
    return fp8.eval()


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
    ids = top_k_index.to(torch.int32)  # ids outside [0, E) (EP sentinels) contribute nothing
    return reference.fused_experts_quantized(
        hidden_states, ops.w13, ops.w2, ids, top_k_weights.to(torch.float32),
        scheme=plan.scheme, activation=plan.activation)


class Fp8ExpertsSwap:
    """Every experts module of a model and its fp8 twin; `use` puts one set in place."""

    def __init__(self, model: torch.nn.Module, block: int) -> None:
        from moekit.integrations.transformers import is_experts_module

        self.block = block
        self._slots = []  # (parent, attribute, bf16 module, fp8 module)
        for name, module in list(model.named_modules()):
            if not is_experts_module(module) or not name:
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            self._slots.append((parent, attr, module, fp8_experts_like(module, block)))

    def __len__(self) -> int:
        return len(self._slots)

    def use(self, fp8: bool) -> None:
        """Put the fp8 modules (True) or the model's own bf16 ones (False) in place."""
        for parent, attr, bf16_module, fp8_module in self._slots:
            setattr(parent, attr, fp8_module if fp8 else bf16_module)

    def fp8_bytes(self) -> int:
        """Bytes of the fp8 modules' weights and scales."""
        return sum(p.numel() * p.element_size() for *_, m in self._slots for p in m.parameters())
