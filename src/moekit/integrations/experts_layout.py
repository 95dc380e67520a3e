"""Reading a transformers experts module as moekit operands, converted once.

transformers (≥ 5.7) describes an experts module by flags that its
`@use_experts_implementation` decorator sets on the instance, and by code:

    has_gate          gate_up_proj (gated) or up_proj (no gate) holds GEMM1's weights
    is_transposed     weights stored [E, in, out] instead of [E, out, in]
    is_concatenated   gate/up halves stacked [gate; up] (moekit's layout) or interleaved
                      [g0, u0, g1, u1, ...] (gpt-oss)
    has_bias          gate_up_proj_bias / down_proj_bias exist
    has_post_expert_norm   a norm between the expert and the router weight (not servable:
                      moekit applies the weight inside GEMM2's epilogue)
    _apply_gate / act_fn   the activation, as code

moekit wants w13 [E, 2I, H] (gate rows first), w2 [E, H, I], b13 [E, 2I], b2 [E, H] and
an `Activation` value. This module makes that translation in two steps:

1. A *plan*, once per module: which transforms the weights need and which moekit
   activation the module computes. The activation is identified by evaluating the
   module's own `_apply_gate` (or `act_fn`) on a probe tensor and comparing it with each
   candidate moekit activation: transformers states activations as code, not values, and
   a probe catches what reading class names would miss (gpt-oss's interleaved clamped
   SwiGLU, a sibling model's concatenated copy of it, gelu vs. its tanh approximation).
   A module that matches no candidate, or has flags moekit cannot serve, gets a plan
   with a reason instead, and the caller falls back to transformers.
2. *Operands*: when the module's storage already is moekit's layout (Mixtral, Qwen3-MoE,
   OLMoE, DeepSeek-V3) they alias the live parameters, at no cost and never stale.
   Otherwise (gpt-oss: transposed and interleaved) the converted copies are made once and
   cached on the module, keyed by each source parameter's identity (a weak reference,
   so a replaced parameter is noticed even when the allocator hands its address to the
   new one, and the old one is not kept alive), storage address and version counter.
   Loading new weights (`load_state_dict`), `.to()`, assigning a new parameter, or an
   in-place update such as `p.mul_(2)` under `no_grad` each trigger exactly one
   reconversion. Writes through `p.data` bypass the version counter and are not seen.
   The copies double the experts' memory for such modules; they are made under
   `no_grad` (this path is for inference).

Under `torch.compile` the key cannot be read (`data_ptr` is not traceable): a cached
conversion is used as is, and changes to the weights after compiling are not seen. A
missing plan or conversion is made eagerly, outside the graph (a graph break for that
trace). Call `prepare_experts` (or `moekit.integrations.transformers.prepare_model`)
before compiling so that compiled graphs read the cached copies without a break.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moekit.activation import Activation
from moekit.reference.activation import apply_activation

# Attributes moekit keeps on the transformers module (plain attributes: not parameters
# or buffers, so they stay out of state_dict and `.to()`; the cache key notices moves).
PLAN_ATTR = "_moekit_plan"
CACHE_ATTR = "_moekit_operands"

# Gated activations a transformers `_apply_gate` may compute, tried in this order;
# swigluoai is added with the module's own constants when it has `alpha`/`limit`.
_GATED_CANDIDATES = ("silu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class ExpertsPlan:
    """What one experts module needs, decided once.

    `activation` is None when the module cannot be served; `reason` then says why.
    """

    activation: Activation | None
    gated: bool = True
    transposed: bool = False
    interleaved: bool = False
    has_bias: bool = False
    reason: str = ""

    @property
    def supported(self) -> bool:
        return self.activation is not None

    @property
    def converts(self) -> bool:
        """True when the weights need a copy into moekit's layout (else they are aliased)."""
        return self.transposed or self.interleaved


@dataclass(frozen=True, eq=False)
class SourceId:
    """Which tensor a converted copy came from, and in which state.

    Compared with `matches`, not `==`: a weak reference compares its referents, and
    tensors compare element-wise.
    """

    ref: weakref.ref
    data_ptr: int
    version: int | None

    @classmethod
    def of(cls, t: torch.Tensor) -> SourceId:
        return cls(weakref.ref(t), t.data_ptr(), _version(t))

    def matches(self, t: torch.Tensor) -> bool:
        return self.ref() is t and self.data_ptr == t.data_ptr() and self.version == _version(t)


def sources_match(ids: tuple[SourceId, ...], tensors: list[torch.Tensor]) -> bool:
    """Whether a cache made from the tensors `ids` identify is still theirs."""
    return len(ids) == len(tensors) and all(
        sid.matches(t) for sid, t in zip(ids, tensors, strict=True))


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


@dataclass(frozen=True, eq=False)
class ExpertsOperands:
    """An experts module's weights in moekit's layout.

    w13: [E, 2I, H] (gate rows first) or [E, I, H] without a gate. w2: [E, H, I].
    b13: [E, 2I] or None. b2: [E, H] or None. `sources` identifies the parameters the
    copies were made from (empty when the operands alias them).
    """

    w13: torch.Tensor
    w2: torch.Tensor
    b13: torch.Tensor | None
    b2: torch.Tensor | None
    sources: tuple[SourceId, ...] = ()

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]


def experts_plan(module: torch.nn.Module) -> ExpertsPlan:
    """The module's cached plan, made on first use (see the module docstring)."""
    return cached_plan(module, PLAN_ATTR, make_plan)


def cached_plan(module: torch.nn.Module, attr: str, make: Callable[[torch.nn.Module], object]):
    """`module.<attr>`, stored there by `make(module)` on first use, outside any graph."""
    plan = getattr(module, attr, None)
    if plan is not None:
        return plan
    if torch.compiler.is_compiling():
        return _store_plan_eagerly(module, attr, make)
    return _store_plan(module, attr, make)


def _store_plan(module: torch.nn.Module, attr: str, make: Callable[[torch.nn.Module], object]):
    plan = make(module)
    setattr(module, attr, plan)
    return plan


# The probe and the attribute store are one-time eager work, not graph material.
_store_plan_eagerly = torch.compiler.disable(_store_plan)


def make_plan(module: torch.nn.Module) -> ExpertsPlan:
    """Read the module's flags and identify its activation; never raises."""
    gated = bool(getattr(module, "has_gate", True))
    transposed = bool(getattr(module, "is_transposed", False))
    # Interleaving only means something for the two halves of a gated GEMM1.
    interleaved = gated and not bool(getattr(module, "is_concatenated", True))
    has_bias = bool(getattr(module, "has_bias", False))

    def unsupported(reason: str) -> ExpertsPlan:
        return ExpertsPlan(activation=None, reason=reason)

    if getattr(module, "has_post_expert_norm", False):
        return unsupported("has_post_expert_norm=True (a norm between expert and router weight)")
    weight_name = "gate_up_proj" if gated else "up_proj"
    for name in (weight_name, "down_proj"):
        weight = getattr(module, name, None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
            return unsupported(f"no 3-d `{name}` tensor")
        if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return unsupported(f"`{name}` has dtype {weight.dtype} (quantised experts)")
    if has_bias:
        for name in (weight_name + "_bias", "down_proj_bias"):
            if not isinstance(getattr(module, name, None), torch.Tensor):
                return unsupported(f"has_bias=True but no `{name}` tensor")
    activation = identify_activation(module, gated=gated, interleaved=interleaved)
    if activation is None:
        what = "_apply_gate" if gated else "act_fn"
        return unsupported(f"its `{what}` matches no moekit activation")
    return ExpertsPlan(activation, gated, transposed, interleaved, has_bias)


def identify_activation(
    module: torch.nn.Module, *, gated: bool, interleaved: bool
) -> Activation | None:
    """Find the moekit activation that the module's gate computes, by evaluating it.

    Args:
        module: a transformers experts module (its `_apply_gate` or `act_fn` is probed).
        gated: the module has gate and up halves.
        interleaved: the halves are interleaved column by column in GEMM1's output.
    Returns:
        The matching `Activation`, or None when no candidate agrees within float32 tolerance.
    """
    device = getattr(module, "gate_up_proj" if gated else "up_proj").device
    gen = torch.Generator().manual_seed(0)
    # Wide enough a range to cross gpt-oss's clamp (limit 7) and the gelu/tanh gap.
    probe = (torch.randn(32, 16, generator=gen) * 6).to(device)  # [n, 2*8] in module layout
    if gated:
        candidates = [Activation(kind) for kind in _GATED_CANDIDATES]
        # gpt-oss names the constant `alpha`; transformers' fp8 experts `swiglu_alpha`.
        alpha = getattr(module, "alpha", None)
        if alpha is None:
            alpha = getattr(module, "swiglu_alpha", None)
        limit = getattr(module, "limit", None)
        if isinstance(alpha, (int, float)) and isinstance(limit, (int, float)):
            candidates.insert(0, Activation("swigluoai", alpha=float(alpha), limit=float(limit)))
        # moekit reads [gate | up]; an interleaved module reads [g0, u0, g1, u1, ...].
        probe_moekit = torch.cat([probe[:, 0::2], probe[:, 1::2]], 1) if interleaved else probe
    else:
        candidates = [Activation("relu2")]
        probe_moekit = probe
    try:
        with torch.no_grad():
            actual = module._apply_gate(probe) if gated else module.act_fn(probe)
    except Exception:  # any failure means "not servable", never a crash
        return None
    actual = actual.float()
    for act in candidates:
        expected = apply_activation(probe_moekit, act).float()
        if actual.shape == expected.shape and torch.allclose(actual, expected, rtol=1e-5,
                                                             atol=1e-5):
            return act
    return None


def experts_operands(module: torch.nn.Module, plan: ExpertsPlan) -> ExpertsOperands:
    """The module's weights in moekit's layout: aliases, or cached converted copies.

    Args:
        module: a transformers experts module with a supported `plan`.
        plan: `experts_plan(module)`.
    Returns:
        ExpertsOperands (see its docstring for shapes).
    """
    if not plan.converts:
        return _source_operands(module, plan)
    if torch.compiler.is_compiling():
        # The key is not traceable; trust a cache made before compiling (see docstring),
        # or make one outside the graph.
        cached = getattr(module, CACHE_ATTR, None)
        return cached if cached is not None else _refresh_eagerly(module, plan)
    return _refresh(module, plan)


def _refresh(module: torch.nn.Module, plan: ExpertsPlan) -> ExpertsOperands:
    """The cached copies, converted again first if any source parameter changed."""
    cached = getattr(module, CACHE_ATTR, None)
    sources = [getattr(module, name) for name in _source_names(plan)]
    if cached is None or not sources_match(cached.sources, sources):
        ops = convert(module, plan)
        ids = tuple(SourceId.of(t) for t in sources)
        cached = ExpertsOperands(ops.w13, ops.w2, ops.b13, ops.b2, ids)
        setattr(module, CACHE_ATTR, cached)
    return cached


_refresh_eagerly = torch.compiler.disable(_refresh)


def prepare_experts(module: torch.nn.Module) -> ExpertsPlan:
    """Plan and (where needed) convert the module now, instead of on its first forward."""
    plan = experts_plan(module)
    if plan.supported:
        experts_operands(module, plan)
    return plan


def _source_names(plan: ExpertsPlan) -> tuple[str, ...]:
    first = "gate_up_proj" if plan.gated else "up_proj"
    names = (first, "down_proj")
    if plan.has_bias:
        names += (first + "_bias", "down_proj_bias")
    return names


def _source_operands(module: torch.nn.Module, plan: ExpertsPlan) -> ExpertsOperands:
    """The source tensors themselves, for modules stored in moekit's layout."""
    w13 = module.gate_up_proj if plan.gated else module.up_proj  # [E, 2I, H] or [E, I, H]
    b13 = b2 = None
    if plan.has_bias:
        b13 = module.gate_up_proj_bias if plan.gated else module.up_proj_bias
        b2 = module.down_proj_bias
    return ExpertsOperands(w13, module.down_proj, b13, b2)


def convert(module: torch.nn.Module, plan: ExpertsPlan) -> ExpertsOperands:
    """Copy the module's weights into moekit's layout (contiguous, detached).

    Transposed storage is w13 [E, H, 2I] and w2 [E, I, H]; interleaved storage puts gate
    column/row j at 2j and up at 2j+1, for the weight and its bias alike.
    """
    src = _source_operands(module, plan)
    # Plain tensors even when the first forward runs under inference_mode: the cache
    # outlives that region, and inference tensors cannot be used outside one.
    with torch.inference_mode(False), torch.no_grad():
        w13, w2 = src.w13, src.w2
        if plan.transposed:
            w13 = w13.transpose(1, 2)  # [E, 2I, H]
            w2 = w2.transpose(1, 2)  # [E, H, I]
        b13 = src.b13
        if plan.interleaved:
            w13 = torch.cat([w13[:, 0::2], w13[:, 1::2]], dim=1)  # [E, 2I, H], gate rows first
            if b13 is not None:
                b13 = torch.cat([b13[:, 0::2], b13[:, 1::2]], dim=1)  # [E, 2I]
        return ExpertsOperands(
            w13.contiguous(),
            w2.contiguous(),
            None if b13 is None else b13.contiguous(),
            None if src.b2 is None else src.b2.contiguous(),
        )
