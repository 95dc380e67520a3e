"""moekit as a transformers experts implementation: `register()`, then pick "moekit".

transformers ≥ 5.7 sends every MoE experts computation through a registry,
`transformers.integrations.moe.ExpertsInterface`: an experts class decorated with
`@use_experts_implementation` looks up `config._experts_implementation` on each forward
and calls `fn(self, hidden_states [T, H], top_k_index [T, k] int64, top_k_weights [T, k])`.
Registering there, rather than patching model classes, serves every model family that
uses the decorator, and transformers keeps owning routing, shared experts and the rest:

    from moekit.integrations import transformers as moekit_tf
    moekit_tf.register()
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moekit")
    # or, on a loaded model: model.set_experts_implementation("moekit")

transformers validates the name against the registry when the model is built or the
implementation is set, so `register()` must run first. It is idempotent.

Each module's weights are read into moekit's layout once (`moekit.integrations.
experts_layout`): aliased when already in it (Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3),
converted and cached when not (gpt-oss: [E, H, 2I] interleaved gate/up, biases, clamped
SwiGLU with the module's alpha/limit). Top-k ids arrive int64 and weights fp32 or bf16;
they go to moekit as they are, which casts both in one launch of its own (so an eager
call still replays: `moekit._topk_cast`). Under expert parallelism
(`_is_expert_parallel`), ids ≥ E are the sentinels of experts on other ranks; they are
turned into −1 ("no expert") explicitly rather than relying on the op's range check.

A module moekit cannot serve (a post-expert norm, an activation it does not have)
runs transformers' own eager forward, with one warning per class.

fp8: transformers routes fine-grained fp8 checkpoints (e4m3 weights, `*_scale_inv` per
128×128 block: DeepSeek-V3, Qwen3-FP8) through the sibling `FP8ExpertsInterface`;
`register()` registers "moekit" there too, and `fp8_experts_forward` runs them by
`moekit.fused_experts_fp8` with the `fp8_block` scheme, the checkpoint's tensors
aliased (`moekit.integrations.fp8_experts_layout`, which also lists the formats that
fall back to transformers' forward). transformers' own fp8 experts load the
`kernels-community/finegrained-fp8` kernel from the Hugging Face Hub; moekit's experts do
not (the model's `FP8Linear` layers still do). A model loaded in bf16 can have its experts
made fp8 as such a checkpoint holds them: `quantize_experts(model)`
(`moekit.integrations.fp8_quantize`).

This path is for inference: converted copies are detached from autograd.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

import moekit
from moekit.integrations.experts_layout import (
    CACHE_ATTR,
    ExpertsPlan,
    experts_operands,
    experts_plan,
    prepare_experts,
)
from moekit.integrations.fp8_experts_layout import (
    FP8_CACHE_ATTR,
    Fp8ExpertsPlan,
    fp8_experts_operands,
    fp8_experts_plan,
    is_fp8_experts_module,
)
from moekit.integrations.fp8_quantize import quantize_experts as quantize_experts  # re-export

NAME = "moekit"

_warned: set[str] = set()


def register(name: str = NAME) -> None:
    """Register moekit's experts forward in transformers' registries under `name`.

    Raises:
        ImportError: transformers is missing or older than 5.7 (no `ExpertsInterface`).
    """
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:
        raise ImportError(
            "moekit's transformers integration needs transformers >= 5.7 "
            "(transformers.integrations.moe.ExpertsInterface); install moekit[transformers]"
        ) from exc
    ExpertsInterface.register(name, experts_forward)
    try:
        from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
    except ImportError:
        return
    FP8ExpertsInterface.register(name, fp8_experts_forward)


def experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts computation of a transformers experts module, run by `moekit.fused_experts`.

    Args:
        self: the experts module (flags and weights as set by `@use_experts_implementation`).
        hidden_states: [T, H].
        top_k_index: [T, k] integer expert ids (int64 from transformers).
        top_k_weights: [T, k] router weights, fp32 or bf16.
    Returns:
        [T, H] in hidden_states' dtype.
    """
    plan = experts_plan(self)
    if not plan.supported:
        _warn_once(self, plan.reason)
        return eager_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    ops = experts_operands(self, plan)
    ids = _local_ids(self, top_k_index, ops.num_experts)  # [T, k]
    # moekit computes in the weights' dtype; autocast can hand us fp32 activations.
    x = hidden_states if hidden_states.dtype == ops.w13.dtype else hidden_states.to(ops.w13.dtype)
    out = moekit.fused_experts(
        x,
        ops.w13,
        ops.w2,
        ids,
        top_k_weights,  # [T, k]; ids and weights cast by the op (one launch, replayable)
        activation=plan.activation,
        b13=ops.b13,
        b2=ops.b2,
    )  # [T, H]
    return out.to(hidden_states.dtype)


def fp8_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts computation of a transformers fp8 experts module (`FP8Experts`), run by
    `moekit.fused_experts_fp8`; arguments and result as `experts_forward`'s."""
    plan = fp8_experts_plan(self)
    if not plan.supported:
        _warn_once(self, plan.reason)
        return eager_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    ops = fp8_experts_operands(self, plan)
    out = moekit.fused_experts_fp8(
        hidden_states,
        ops.w13,
        ops.w2,
        _local_ids(self, top_k_index, ops.num_experts),  # [T, k]
        top_k_weights,  # [T, k]; cast by the op
        scheme=plan.scheme,
        activation=plan.activation,
    )  # [T, H]
    return out


def _local_ids(module: torch.nn.Module, top_k_index: torch.Tensor, num_experts: int):
    """transformers' ids as moekit reads them: under expert parallelism the sentinels of
    other ranks' experts (ids ≥ E) become −1; the dtype stays (the op casts it)."""
    if getattr(module, "_is_expert_parallel", False):
        return top_k_index.masked_fill(top_k_index >= num_experts, -1)
    return top_k_index


def prepare_model(model: torch.nn.Module) -> dict[str, ExpertsPlan | Fp8ExpertsPlan]:
    """Plan and convert every experts module of `model` now, before the first forward.

    Useful before `torch.compile` (compiled graphs then read the cached copies) and to
    learn up front which modules fall back to transformers.

    Returns:
        {module name: its ExpertsPlan (Fp8ExpertsPlan for fp8 modules)} for each experts
        module found.
    """
    plans = {}
    for name, module in model.named_modules():
        if is_fp8_experts_module(module):
            plans[name] = fp8_experts_plan(module)
            if plans[name].supported:
                fp8_experts_operands(module, plans[name])
        elif is_experts_module(module):
            plans[name] = prepare_experts(module)
    return plans


def release_converted(model: torch.nn.Module) -> None:
    """Free the converted weight copies (gpt-oss; fp8 scales widened from e8m0) of `model`;
    they are made again on next use."""
    for module in model.modules():
        if is_experts_module(module):
            for attr in (CACHE_ATTR, FP8_CACHE_ATTR):
                if hasattr(module, attr):
                    delattr(module, attr)


def is_experts_module(module: torch.nn.Module) -> bool:
    """True for modules decorated with transformers' `@use_experts_implementation`."""
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed")


def eager_forward(module: torch.nn.Module) -> Callable:
    """transformers' own forward of the module's class, as written before decoration.

    `@use_experts_implementation` wraps the class's forward with functools.wraps, which
    keeps the original as `__wrapped__`. Without it, calling the decorated forward would
    dispatch back here, so transformers' generic `batched_mm` (which honours every flag
    and the module's own gate) stands in.
    """
    wrapped = getattr(type(module).forward, "__wrapped__", None)
    if wrapped is not None:
        return wrapped
    from transformers.integrations.moe import batched_mm_experts_forward

    return batched_mm_experts_forward


def _warn_once(module: torch.nn.Module, reason: str) -> None:
    name = type(module).__name__
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"moekit cannot serve {name}: {reason}; it runs transformers' eager experts forward",
        stacklevel=3,
    )
