"""`MoE`: the Mixture-of-Experts layer as an `nn.Module` — prepare once, run many.

    hidden [..., H] ─► router (Linear H→E) ─► route() ─► fused_experts() ─► [..., H]

Eager calls replay (`moekit._replay`) as one. At decode sizes (M ≤ 16, `GEMV_ROWS`) the
router GEMM and the routing run inside that call (`moekit.routing.router_topk`: one moekit
kernel where it measured faster, else the GEMV or cuBLAS and a routing launch) instead of
`nn.Linear`'s separate eager call, before `fused_experts` (`fused_experts_fp8` with
`quant`); its arrival counter is the buffer `router_arrivals`, so one layer must not run
on two streams at once. At larger M the router module (cuBLAS) runs, then `fused_moe`
(`fused_moe_fp8`). The module runs at any M where the kernel could behave differently:
hooks on the router, a router that is no plain bias-free `nn.Linear`, autograd
recording, or the reference backend; and with a score-correction bias, which the
one-launch kernel does not take.

The routing is any `moekit.routing.route` computes (`method`: softmax by default;
sigmoid, expert groups and a routed scaling factor for DeepSeek-V3 and Kimi-K2, with
the `e_score_correction_bias` buffer).

With `local_experts` the layer is one rank's share under expert parallelism: the router
still scores all E experts, the module holds only the listed ones' weights, and its
output is their partial sum (summed across ranks by the caller, e.g. an all-reduce).

`prepare()` does everything that depends only on the weights (checks, contiguous
layouts) once; `forward` then only launches kernels, so the layer can be captured in a
CUDA graph or compiled. Parameters keep moekit's layout (DESIGN.md): `w13` [E, 2I, H]
with gate rows first, `w2` [E, H, I]. Loading a state dict writes into the same
(contiguous) parameters, so a prepared layer sees new weights, and moving or casting
the module (`.to()`, `.cuda()`) makes the next forward prepare again; call `prepare()`
again only after replacing a parameter object yourself.

With `quant` (an fp8 scheme) `prepare()` also quantises w13 and w2 once
(`moekit.quant.quantize_weight`) and the experts run by `fused_moe_fp8`, activations
quantised dynamically. The 16-bit parameters stay the layer's state (its state dict, its
master copy); the fp8 copies are made again when a forward finds that a weight changed
in place since (`load_state_dict`, an optimiser step), as their version counters tell.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moekit._checks import check_fp8_weight_on_input
from moekit._replay import replayed
from moekit.activation import Activation
from moekit.backend import check_backend, resolve_backend
from moekit.experts import fused_experts, fused_moe
from moekit.experts_fp8 import fused_experts_fp8, fused_moe_fp8
from moekit.quant import QuantScheme, quantize_weight
from moekit.routing import PRESETS as ROUTING_PRESETS
from moekit.routing import Routing
from moekit.routing.logits import GEMV_ROWS
from moekit.routing.method import check_route_args
from moekit.routing.router_topk import router_topk

_PRESET_NAMES = {routing: name for name, routing in ROUTING_PRESETS.items()}


class MoE(nn.Module):
    """A routed MoE layer: router, k-of-E experts with a gated (or relu2) MLP each.

    Args:
        num_experts: E. top_k: experts per token. hidden_size: H. intermediate_size: I.
        activation: name or `Activation` (default SwiGLU, "silu").
        bias: whether the expert GEMMs have biases (gpt-oss).
        method: the routing, a `moekit.routing` preset name ("softmax", "sigmoid",
            "topk_softmax") or a `Routing` (DeepSeek-V3: `Routing("sigmoid", n_group=8,
            topk_group=4, routed_scaling_factor=2.5)`).
        renormalize: renormalise the k routing weights to sum to 1 (None: the method's
            default; the softmax preset's is True).
        e_score_correction_bias: hold a float32 [E] buffer `e_score_correction_bias`
            (zeros; a checkpoint loads it) added to the scores to select experts
            (DeepSeek-V3's, as transformers' gate holds it).
        apply_router_weight_on_input: scale each expert's input by its routing weight
            instead of its output (Llama-4: `method="sigmoid"`, `renormalize=False`,
            top-1; fp8 experts take it at top-1 only).
        local_experts: the expert ids (of E) this module holds, for expert parallelism;
            default all. w13/w2 then have len(local_experts) experts, in that order.
        quant: None (16-bit experts), or an fp8 `QuantScheme` or preset name ("fp8_tensor",
            "fp8_channel", "fp8_block") with dynamic activation scales (static ones need
            calibrated input scales: `fused_experts_fp8` with `QuantizedWeight.input_scale`).
        backend: "auto", "triton" or "reference" (see `moekit.backend`).
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        activation: str | Activation = "silu",
        bias: bool = False,
        method: str | Routing = "softmax",
        renormalize: bool | None = None,
        e_score_correction_bias: bool = False,
        apply_router_weight_on_input: bool = False,
        local_experts: list[int] | tuple[int, ...] | None = None,
        quant: str | QuantScheme | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected an int in [1, {num_experts}], got {top_k!r}")
        held = _check_local_experts(local_experts, num_experts)
        self.scheme = _check_quant(quant)
        self.activation = Activation.parse(activation)
        if self.scheme is not None:  # refused at construction, not at the first forward
            check_fp8_weight_on_input(apply_router_weight_on_input, top_k)
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self.top_k = top_k
        self._num_experts = num_experts
        self.backend = backend
        kw = {"device": device, "dtype": dtype}
        rows = self.activation.gemm1_rows(intermediate_size)
        self.router = nn.Linear(hidden_size, num_experts, bias=False, **kw)
        self.w13 = nn.Parameter(torch.empty(held, rows, hidden_size, **kw))
        self.w2 = nn.Parameter(torch.empty(held, hidden_size, intermediate_size, **kw))
        self.b13 = nn.Parameter(torch.empty(held, rows, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.empty(held, hidden_size, **kw)) if bias else None
        expert_map = None
        if local_experts is not None:  # [E] int32: each expert's local id, −1 elsewhere
            expert_map = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
            expert_map[list(local_experts)] = torch.arange(held, dtype=torch.int32,
                                                           device=device)
        self.register_buffer("expert_map", expert_map, persistent=False)
        correction = (torch.zeros(num_experts, dtype=torch.float32, device=device)
                      if e_score_correction_bias else None)
        self.register_buffer("e_score_correction_bias", correction)
        self.routing = Routing.parse(method, renormalize=renormalize)  # checked with the bias
        # `router_topk`'s arrival counter: zero between calls, one per layer (module doc)
        self.register_buffer("router_arrivals", torch.zeros(1, dtype=torch.int32,
                                                             device=device), persistent=False)
        self._prepared: dict[str, object] | None = None
        self._quantized_from: tuple[int, ...] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like nn.Linear (uniform ±1/sqrt(fan_in)); biases to zero."""
        with torch.no_grad():
            for w in (self.w13, self.w2):
                bound = w.shape[-1] ** -0.5
                w.uniform_(-bound, bound)
            for b in (self.b13, self.b2):
                if b is not None:
                    b.zero_()
        self.router.reset_parameters()
        self._prepared = None

    @classmethod
    def from_weights(
        cls,
        router_weight: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        top_k: int,
        *,
        b13: torch.Tensor | None = None,
        b2: torch.Tensor | None = None,
        e_score_correction_bias: torch.Tensor | None = None,
        **kwargs,
    ) -> MoE:
        """Build a layer around existing weights (router [E, H], w13, w2 as in DESIGN.md,
        the routing's score-correction bias [E]; with `local_experts` in kwargs, w13/w2
        hold those experts only)."""
        num_experts = router_weight.shape[0]
        _, hidden_size, inter = w2.shape
        layer = cls(num_experts, top_k, hidden_size, inter, bias=b13 is not None,
                    e_score_correction_bias=e_score_correction_bias is not None,
                    device=w2.device, dtype=w2.dtype, **kwargs)
        with torch.no_grad():
            if e_score_correction_bias is not None:
                layer.e_score_correction_bias.copy_(e_score_correction_bias)
            layer.router.weight.copy_(router_weight)
            layer.w13.copy_(w13)
            layer.w2.copy_(w2)
            if b13 is not None:
                layer.b13.copy_(b13)
                layer.b2.copy_(b2 if b2 is not None else torch.zeros_like(layer.b2))
        return layer

    def prepare(self) -> MoE:
        """Check the weights once and hold them in the layout the kernels read (quantised,
        with `quant`)."""
        contiguous = lambda t: None if t is None else t.detach().contiguous()
        self._prepared = {
            "w13": contiguous(self.w13), "w2": contiguous(self.w2),
            "b13": contiguous(self.b13), "b2": contiguous(self.b2),
        }
        if self.scheme is not None:
            with torch.no_grad():
                for name in ("w13", "w2"):
                    self._prepared[name] = quantize_weight(self._prepared[name],
                                                           self.scheme.weight)
            self._quantized_from = self._weights_state()
        if self.w13.is_cuda and not torch.compiler.is_compiling():
            _initialise_cublas(self.w13.device)
        return self

    def _apply(self, fn, *args, **kwargs):
        """`.to()`, `.cuda()`, `.half()` and the like give the parameters new tensors; the
        prepared copies still alias (or were quantised from) the old ones, so the next
        forward prepares again. A cast leaves the score-correction bias in float32 (moved
        only), as transformers keeps it: rounded to 16 bits it would select other experts."""
        correction = self.e_score_correction_bias
        module = super()._apply(fn, *args, **kwargs)
        moved = self.e_score_correction_bias
        if correction is not None and moved.dtype != torch.float32:
            self.e_score_correction_bias = correction.to(moved.device, torch.float32)
        self._prepared = None
        self._quantized_from = None
        return module

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint's score-correction bias is loaded as float32 whatever its dtype (with
        `assign=True` the buffer would otherwise become the checkpoint's 16-bit tensor)."""
        key = prefix + "e_score_correction_bias"
        bias = state_dict.get(key)
        if (self.e_score_correction_bias is not None and isinstance(bias, torch.Tensor)
                and bias.dtype != torch.float32):
            state_dict[key] = bias.float()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def routing(self) -> Routing:
        """How the router's logits become the k experts and weights (settable: a preset
        name or a `Routing`, checked against E and top_k)."""
        return self._routing

    @routing.setter
    def routing(self, method: str | Routing) -> None:
        routing = Routing.parse(method)
        held = getattr(self, "e_score_correction_bias", None)  # (none yet in __init__)
        bias = None if held is None else torch.empty(self._num_experts, device="meta")
        check_route_args(torch.empty(0, self._num_experts, device="meta"), self.top_k,
                         routing, bias)
        self._routing = routing
        # What forward passes on: a preset's name where it is one — the replay's call key
        # reads a string in one check, a `Routing` field by field (2.2 → 2.8 µs a call).
        self._method = _PRESET_NAMES.get(routing, routing)

    @property
    def backend(self) -> str:
        """"auto", "triton" or "reference" (see `moekit.backend`; settable, checked at
        once rather than at the next forward)."""
        return self._backend

    @backend.setter
    def backend(self, backend: str) -> None:
        self._backend = check_backend(backend)

    @property
    def renormalize(self) -> bool:
        """Whether the k routing weights are renormalised (`self.routing`'s field;
        settable)."""
        return self.routing.renormalize

    @renormalize.setter
    def renormalize(self, value: bool) -> None:
        self.routing = dataclasses.replace(self.routing, renormalize=bool(value))

    def _weights_state(self) -> tuple[int, ...]:
        """What the fp8 copies were made from: the weights' storage and version counters."""
        return (self.w13.data_ptr(), self.w13._version, self.w2.data_ptr(), self.w2._version)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] → [..., H] in hidden's dtype."""
        if self._prepared is None or (
                self.scheme is not None and not torch.compiler.is_compiling()
                and self._quantized_from != self._weights_state()):
            self.prepare()
        weights = self._prepared
        self._check_input(hidden)
        # [M, H]; a 2-D input as it is (a view op costs ~1.5 µs of host time per call)
        flat = hidden if hidden.dim() == 2 else hidden.reshape(-1, hidden.shape[-1])
        experts = (weights["w13"], weights["w2"], self.top_k)
        options = dict(method=self._method, activation=self.activation,
                       b13=weights["b13"], b2=weights["b2"], expert_map=self.expert_map,
                       apply_router_weight_on_input=self.apply_router_weight_on_input,
                       backend=self._backend)
        if self._router_kernel_serves(flat):
            out = _routed_experts(flat, self.router.weight, self.router_arrivals, *experts,
                                  scheme=self.scheme, **options)
        else:
            options["e_score_correction_bias"] = self.e_score_correction_bias
            if self.scheme is None:
                out = fused_moe(flat, self.router(flat), *experts, **options)
            else:
                out = fused_moe_fp8(flat, self.router(flat), *experts, scheme=self.scheme,
                                    **options)
        return out if flat is hidden else out.reshape(hidden.shape)

    def _check_input(self, hidden: torch.Tensor) -> None:
        """hidden [..., H] in the layer's dtype (the router's; the experts take no other,
        autocast or not): else the router's matmul fails first, naming neither."""
        weight = self.router.weight
        if hidden.shape[-1:] != weight.shape[1:]:
            raise ValueError(f"hidden: expected [..., {weight.shape[1]}] (hidden_size), "
                             f"got shape {tuple(hidden.shape)}")
        if hidden.dtype != weight.dtype:
            raise TypeError(f"hidden: expected dtype {weight.dtype} (the layer's; cast the "
                            f"layer with .to(dtype) to run another), got {hidden.dtype}")

    def _router_kernel_serves(self, flat: torch.Tensor) -> bool:
        """Whether `router_topk`'s GEMV computes what `self.router(flat)` would (the module
        docstring's conditions; it takes no score-correction bias)."""
        router = self.router
        if (flat.shape[0] > GEMV_ROWS or type(router) is not nn.Linear
                or router.bias is not None or self.e_score_correction_bias is not None):
            return False
        weight = router.weight
        return (not (torch.is_grad_enabled() and weight.requires_grad)
                and not (router._forward_hooks or router._forward_pre_hooks
                         or nn.modules.module._global_forward_hooks
                         or nn.modules.module._global_forward_pre_hooks)
                and resolve_backend(self._backend, flat) == "triton")  # dtype: `_check_input`

    def extra_repr(self) -> str:
        held, rows, h = self.w13.shape
        experts = self.router.weight.shape[0]
        parts = [f"experts={experts}"]
        if self.expert_map is not None:
            parts.append(f"local_experts={held}")
        parts += [f"top_k={self.top_k}", f"hidden={h}", f"intermediate={self.w2.shape[2]}",
                  f"activation={self.activation.kind}", f"bias={self.b13 is not None}"]
        if self.routing != ROUTING_PRESETS["softmax"]:
            parts.append(str(self.routing))
        if self.e_score_correction_bias is not None:
            parts.append("e_score_correction_bias")
        if self.apply_router_weight_on_input:
            parts.append("apply_router_weight_on_input")
        if self.scheme is not None:
            parts.append(f"quant={self.scheme.preset_name or 'fp8'}")
        return ", ".join(parts)


def _check_quant(quant) -> QuantScheme | None:
    """The layer's fp8 scheme (None for 16-bit experts); activations must be dynamic."""
    if quant is None:
        return None
    scheme = QuantScheme.parse(quant)
    if not scheme.activation.dynamic:
        raise ValueError(
            "quant: static activation scales need calibrated input scales, which the layer "
            "does not hold; use fused_experts_fp8 with QuantizedWeight.input_scale")
    return scheme


def _check_local_experts(local_experts, num_experts: int) -> int:
    """How many experts the module holds; `local_experts` must list distinct ids in
    [0, E)."""
    if local_experts is None:
        return num_experts
    ids = list(local_experts)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"local_experts: expected a non-empty list of ints, got {local_experts!r}")
    if len(set(ids)) != len(ids) or not all(0 <= i < num_experts for i in ids):
        raise ValueError(
            f"local_experts: expected distinct expert ids in [0, {num_experts}), got {ids}")
    return len(ids)


def _initialise_cublas(device: torch.device) -> None:
    """Create this device's cuBLAS handle now: up to `GEMV_ROWS` tokens the layer may run
    no cuBLAS call, so a warm-up at decode alone would leave the router module's first one
    to a CUDA-graph capture at a larger M, where creating the handle invalidates the
    capture (bench/NOTES.md, sessions 32 and 33)."""
    if not torch.cuda.is_current_stream_capturing():
        with torch.cuda.device(device):
            torch.cuda.current_blas_handle()


@replayed
def _routed_experts(flat, router_weight, arrivals, w13, w2, top_k, *, scheme, method,
                    **options):
    """The router GEMV and routing as one launch (`router_topk`), then `fused_experts`
    (`fused_experts_fp8` with a scheme): one replayed eager call."""
    topk = router_topk(flat, router_weight, top_k, arrivals, method=method,
                       backend=options["backend"])
    if scheme is None:
        return fused_experts(flat, w13, w2, topk.ids, topk.weights, **options)
    return fused_experts_fp8(flat, w13, w2, topk.ids, topk.weights, scheme=scheme, **options)
