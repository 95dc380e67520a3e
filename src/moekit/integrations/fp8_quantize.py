"""bf16 transformers experts into fine-grained fp8 ones, as an fp8 checkpoint holds them.

A model loaded in bf16 (or built with random weights, as `moekit run` does) can serve its
experts in fp8: `quantize_experts(model)` replaces every experts module moekit can hold
in fp8 by a transformers `FP8Experts` module (decorated as transformers' fp8 loader
decorates it) whose weights are transformers' own checkpoint quantiser's (`Fp8Quantize`:
e4m3 values, `*_scale_inv` per block × block tile, float32), quantised expert by expert
(no float32 copy of a whole layer). moekit then serves them through
`FP8ExpertsInterface` (`moekit.integrations.fp8_experts_layout`) with
`experts_implementation="moekit"`; the bf16 weights are freed with the modules replaced.

The block is 128 (DeepSeek-V3's and Qwen3-FP8's) where H and I allow it, else the largest
power of two of at least 16 dividing both (tiny test widths). A module is left in bf16,
with the reason returned, when `FP8Experts` cannot hold it: expert biases (gpt-oss),
weights stored transposed or gate/up interleaved, or widths without such a block.
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
        raise ValueError(f"H = {hidden} and I = {inter} share no power-of-two block of at "
                         f"least {MIN_BLOCK}")
    return block


def quantize_experts(model: torch.nn.Module, *, block: int | None = None) -> dict[str, str]:
    """Replace each experts module of `model` by its fine-grained fp8 twin, in place.

    Args:
        model: a transformers model (or any module holding transformers experts modules).
        block: the square block of the weight scales; default per module (`fp8_block`).
    Returns:
        {module name: "fp8 e4m3, BxB block scales", or why it stays as it was}.
    """
    done = {}
    for name, parent, attr, module in experts_slots(model):
        try:
            twin = fp8_experts_like(module, block)
        except ValueError as exc:
            done[name] = f"kept: {exc}"
            continue
        setattr(parent, attr, twin)
        done[name] = f"fp8 e4m3, {twin.block_size[0]}x{twin.block_size[1]} block scales"
    return done


def experts_slots(
    model: torch.nn.Module,
) -> list[tuple[str, torch.nn.Module, str, torch.nn.Module]]:
    """(name, parent module, attribute, module) of each transformers experts module below
    `model`: where a replacement goes."""
    from moekit.integrations.transformers import is_experts_module

    slots = []
    for name, module in model.named_modules():
        if name and is_experts_module(module):
            parent_name, _, attr = name.rpartition(".")
            slots.append((name, model.get_submodule(parent_name), attr, module))
    return slots


@torch.no_grad()
def fp8_experts_like(module: torch.nn.Module, block: int | None = None) -> torch.nn.Module:
    """An `FP8Experts` module holding `module`'s experts quantised as a checkpoint would.

    Args:
        module: a transformers experts module stored [E, out, in], gate rows first, no biases.
        block: the square block of the weight scales; default `fp8_block` of its widths.
    Raises:
        ValueError: for experts `FP8Experts` cannot hold (biases, transposed or interleaved
            storage, widths without a block).
    """
    name = type(module).__name__
    if getattr(module, "has_bias", False):
        raise ValueError(f"{name} has expert biases, which transformers' fp8 experts do not "
                         "hold")
    if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True):
        raise ValueError(f"{name} is not stored [E, out, in] with gate rows first")
    gated = bool(getattr(module, "has_gate", True))
    first = "gate_up_proj" if gated else "up_proj"
    source = getattr(module, first)
    if block is None:
        block = fp8_block(source.shape[2], module.down_proj.shape[2])
    with torch.device(source.device):
        fp8 = _fp8_experts_class(gated)(module.config, block_size=(block, block),
                                        has_gate=gated)
    quantizer = _quantizer(block)
    for proj in (first, "down_proj"):
        source, target = getattr(module, proj), getattr(fp8, proj)
        scales = getattr(fp8, proj + "_scale_inv")
        if source.shape != target.shape:
            raise ValueError(f"{name}.{proj} is {tuple(source.shape)}, the fp8 module's "
                             f"{tuple(target.shape)}")
        for expert in range(source.shape[0]):  # one [N, K] at a time: a small float32 copy
            made = quantizer._quantize_one(proj, source[expert])
            if made[proj].dtype != target.dtype:  # the quantiser passes untileable shapes
                raise ValueError(f"{name}.{proj}: {tuple(source.shape[1:])} is not made of "
                                 f"{block}x{block} blocks")
            target[expert].copy_(made[proj])
            scales[expert].copy_(made[proj + "_scale_inv"])
    return fp8.train(module.training)


@functools.cache
def _fp8_experts_class(has_gate: bool) -> type[torch.nn.Module]:
    """transformers' `FP8Experts`, decorated as its fp8 loader decorates it (on a subclass,
    so the library's class stays as it is)."""
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts
    from transformers.integrations.moe import use_experts_implementation

    cls = type("QuantizedFP8Experts", (FP8Experts,), {})
    return use_experts_implementation(experts_class=cls,
                                      experts_interface=ALL_FP8_EXPERTS_FUNCTIONS,
                                      has_gate=has_gate)


def _quantizer(block: int):
    """transformers' checkpoint quantiser for `block` × `block` tiles, float32 scales."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = types.SimpleNamespace(weight_block_size=(block, block), scale_fmt="float")
    quantizer = Fp8Quantize(types.SimpleNamespace(quantization_config=config))
    if not hasattr(quantizer, "_quantize_one"):
        raise ValueError("this transformers' Fp8Quantize has no _quantize_one (known in "
                         "5.17–5.25)")
    return quantizer
