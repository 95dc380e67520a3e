"""Reading a transformers fp8 experts module (`FP8Experts`) as moekit's quantised operands.

transformers loads fine-grained fp8 checkpoints (DeepSeek-V3, Qwen3-FP8, …: e4m3 weights
with `*_scale_inv` per bn×bk block) into `FP8Experts` modules and sends their forward
through `FP8ExpertsInterface`:

    gate_up_proj [E, 2I, H] e4m3   gate_up_proj_scale_inv [E, ceil(2I/bn), ceil(H/bk)]
    down_proj    [E, H, I]  e4m3   down_proj_scale_inv    [E, ceil(H/bn), ceil(I/bk)]
    block_size (bn, bk); activation_scheme "dynamic": activations in 1×bk groups per token

That is moekit's `QuantScheme.fp8_block((bn, bk))` with the same scale convention
(x ≈ q · scale_inv), so the weights are aliased, not copied: a `QuantizedWeight` each,
made once and cached on the module under the same identity key as the 16-bit path's
converted copies (`experts_layout.SourceId`). Scales stored as powers of two
(`scale_fmt="ue8m0"`, float8_e8m0fnu) are widened to float32 once — the only copy, a
few KB per expert.

What the plan declines (the module then runs transformers' own forward, with one
warning per class): static activation scales (per expert in transformers, one per GEMM
in moekit), per-tensor weights (`block_size` None: one scale per gate/up half), FP4
weights, biases, a post-expert norm, K groups the kernels do not take (powers of two in
[16, 512]), an activation moekit does not have, and I not a multiple of bn: a checkpoint's
gate and up halves are quantised apart, so a block straddling them would be read with
the wrong scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.activation import Activation
from moekit.integrations.experts_layout import (
    SourceId,
    cached_plan,
    identify_activation,
    sources_match,
)
from moekit.quant import QuantizedWeight, QuantScheme

# Attributes moekit keeps on the transformers module (plain attributes, as in experts_layout).
FP8_PLAN_ATTR = "_moekit_fp8_plan"
FP8_CACHE_ATTR = "_moekit_fp8_operands"

_SCALE_DTYPES = (torch.float32, getattr(torch, "float8_e8m0fnu", torch.float32))


@dataclass(frozen=True)
class Fp8ExpertsPlan:
    """What one fp8 experts module needs, decided once; `scheme` is None when moekit
    cannot serve it, and `reason` then says why."""

    scheme: QuantScheme | None
    activation: Activation | None = None
    gated: bool = True
    reason: str = ""

    @property
    def supported(self) -> bool:
        return self.scheme is not None


@dataclass(frozen=True, eq=False)
class Fp8ExpertsOperands:
    """An fp8 experts module's weights as moekit operands: w13 [E, 2I, H] (or [E, I, H]
    without a gate) and w2 [E, H, I], and the identity of the tensors they came from."""

    w13: QuantizedWeight
    w2: QuantizedWeight
    sources: tuple[SourceId, ...]

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]


def is_fp8_experts_module(module: torch.nn.Module) -> bool:
    """True for an experts module whose weights carry `*_scale_inv` (transformers' fp8)."""
    return isinstance(getattr(module, "down_proj_scale_inv", None), torch.Tensor)


def fp8_experts_plan(module: torch.nn.Module) -> Fp8ExpertsPlan:
    """The module's cached plan, made on first use (outside any compiled graph)."""
    return cached_plan(module, FP8_PLAN_ATTR, make_fp8_plan)


def make_fp8_plan(module: torch.nn.Module) -> Fp8ExpertsPlan:
    """Read the module's format and identify its activation; never raises."""

    def unsupported(reason: str) -> Fp8ExpertsPlan:
        return Fp8ExpertsPlan(scheme=None, reason=reason)

    gated = bool(getattr(module, "has_gate", True))
    if getattr(module, "has_post_expert_norm", False):
        return unsupported("has_post_expert_norm=True (a norm between expert and router weight)")
    if getattr(module, "has_bias", False):
        return unsupported("fp8 experts with biases")
    if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True):
        return unsupported("fp8 weights not stored [E, out, in] with gate rows first")
    if getattr(module, "activation_scheme", "dynamic") != "dynamic":
        return unsupported("static fp8 activation scales (one per expert; moekit takes one "
                           "per GEMM)")
    block = getattr(module, "block_size", None)
    if block is None:
        return unsupported("per-tensor fp8 weights (block_size None)")
    try:
        bn, bk = (int(b) for b in block)
    except (TypeError, ValueError):
        return unsupported(f"block_size {block!r} is not a pair of ints")
    if bk < 16 or bk > 512 or bk & (bk - 1) or bn < 1:
        return unsupported(f"block_size {(bn, bk)}: the kernels take K groups that are powers "
                           "of two in [16, 512]")
    first = "gate_up_proj" if gated else "up_proj"
    for name in (first, "down_proj"):
        weight, scale = getattr(module, name, None), getattr(module, name + "_scale_inv", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
            return unsupported(f"no 3-d `{name}` tensor")
        if weight.dtype != torch.float8_e4m3fn:
            return unsupported(f"`{name}` has dtype {weight.dtype} (moekit serves fp8 e4m3)")
        if not isinstance(scale, torch.Tensor) or scale.dtype not in _SCALE_DTYPES:
            return unsupported(f"`{name}_scale_inv` is missing or not float32/e8m0")
    inter = module.down_proj.shape[2]
    if gated and inter % bn:
        return unsupported(f"I = {inter} is not a multiple of the block's {bn} rows (gate and "
                           "up scales would straddle)")
    scheme = QuantScheme.fp8_block((bn, bk))
    expected = (
        (first, scheme.weight.scale_shape(getattr(module, first).shape)),
        ("down_proj", scheme.weight.scale_shape(module.down_proj.shape)),
    )
    for name, shape in expected:
        actual = tuple(getattr(module, name + "_scale_inv").shape)
        if actual != shape:
            return unsupported(f"`{name}_scale_inv` is {actual}, not the {shape} of "
                               f"{(bn, bk)} blocks")
    activation = identify_activation(module, gated=gated, interleaved=False)
    if activation is None:
        what = "_apply_gate" if gated else "act_fn"
        return unsupported(f"its `{what}` matches no moekit activation")
    return Fp8ExpertsPlan(scheme, activation, gated)


def fp8_experts_operands(module: torch.nn.Module, plan: Fp8ExpertsPlan) -> Fp8ExpertsOperands:
    """The module's weights as `QuantizedWeight`s, cached on the module and made again
    when a source tensor changes (the rules of `experts_layout`)."""
    if torch.compiler.is_compiling():
        cached = getattr(module, FP8_CACHE_ATTR, None)
        return cached if cached is not None else _refresh_eagerly(module, plan)
    return _refresh(module, plan)


def _refresh(module: torch.nn.Module, plan: Fp8ExpertsPlan) -> Fp8ExpertsOperands:
    first = "gate_up_proj" if plan.gated else "up_proj"
    names = (first, first + "_scale_inv", "down_proj", "down_proj_scale_inv")
    sources = [getattr(module, name) for name in names]
    cached = getattr(module, FP8_CACHE_ATTR, None)
    if cached is None or not sources_match(cached.sources, sources):
        spec = plan.scheme.weight
        with torch.inference_mode(False), torch.no_grad():
            w13 = QuantizedWeight(sources[0].detach(), _float_scale(sources[1]), spec)
            w2 = QuantizedWeight(sources[2].detach(), _float_scale(sources[3]), spec)
        cached = Fp8ExpertsOperands(w13, w2, tuple(SourceId.of(t) for t in sources))
        setattr(module, FP8_CACHE_ATTR, cached)
    return cached


_refresh_eagerly = torch.compiler.disable(_refresh)


def _float_scale(scale: torch.Tensor) -> torch.Tensor:
    """float32 scales: aliased, or widened from powers of two (e8m0) exactly."""
    if scale.dtype == torch.float32:
        return scale.detach()
    return scale.detach().to(torch.float32)
