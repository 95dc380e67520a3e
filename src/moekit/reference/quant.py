"""Reference fused experts on quantised operands: what the fp8 kernels must compute.

    hidden [M, H] ─► quantise per scheme.activation (GEMM1's input) ─► dequantise
                  ─► per pair: x @ dq(w13[e])ᵀ (+b13), activation     ─► inter [P, I]
                  ─► quantise per scheme.activation (GEMM2's input) ─► dequantise
                  ─► per pair: inter @ dq(w2[e])ᵀ (+b2), × router weight, Σ over slots ─► [M, H]

P counts the valid token–expert pairs. Everything is computed in float32 on dequantised
values, which equals the kernels' fp8 dot products with the scales applied afterwards up
to float32 rounding, so a kernel is tested against this to float32-accumulation accuracy.

GEMM1's input is quantised per `scheme.activation`, once, before the dispatch (every
pair of a token reads the same row). GEMM2's input is quantised per
`scheme.gemm2_input`: with dynamic activations in 1×128 groups of each pair row (the
weights' K group if they group K), whatever the scheme's activation granularity, because
the kernels quantise it in GEMM1's epilogue, which sees 128-column pieces of a row
(`moekit.quant.scheme` says why); with static activations by w2.input_scale.

`moekit.reference.fused_experts` cannot be reused whole because GEMM2's input is
quantised between its two GEMMs; this keeps its structure (a loop over the active
experts, float32 accumulation, index_add combine) and reuses `apply_activation`.
"""

from __future__ import annotations

import torch

from moekit._checks import FLOAT_DTYPES, check_fp8_weight_on_input, check_shape, check_tensor
from moekit.activation import Activation
from moekit.quant import QuantizedWeight, QuantScheme, QuantSpec, dequantize, quantize
from moekit.quant.weight import check_quantized_weights
from moekit.reference.activation import apply_activation


def fused_experts_quantized(
    hidden: torch.Tensor,
    w13: QuantizedWeight,
    w2: QuantizedWeight,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    scheme: str | QuantScheme,
    activation: str | Activation = "silu",
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
) -> torch.Tensor:
    """out[m] = Σ_j w[m, j] · expert_{ids[m, j]}(hidden[m]) with fp8 weights and GEMM inputs.

    Args:
        hidden: [M, H] bf16/fp16/fp32.
        w13: quantised [E, 2I, H] (gate rows, then up), or [E, I, H] for relu2.
        w2: quantised [E, H, I].
        topk_ids: [M, k] integer; ids outside [0, E) contribute nothing.
        topk_weights: [M, k] float.
        scheme: a `QuantScheme` or a preset's name; w13 and w2 must be in its weight
            format. With static activations, w13.input_scale and w2.input_scale give
            the per-tensor scales of GEMM1's and GEMM2's inputs.
        activation: name or `Activation`.
        b13: optional [E, 2I] (or [E, I]); b2: optional [E, H]; added in float32.
        apply_router_weight_on_input: out[m] = expert_{ids[m, 0]}(w[m, 0] · hidden[m]),
            the product taken in float32 before GEMM1's input is quantised (Llama-4);
            top_k must be 1 — each pair would otherwise need a quantised row of its own.
    Returns:
        [M, H] in hidden's dtype.
    """
    scheme = QuantScheme.parse(scheme)
    act = Activation.parse(activation)
    _check_args(hidden, w13, w2, topk_ids, topk_weights, scheme, act, b13, b2)
    check_fp8_weight_on_input(apply_router_weight_on_input, topk_ids.shape[1])
    a1_spec = _input_spec(scheme.activation, w13, "w13")
    a2_spec = _input_spec(scheme.gemm2_input, w2, "w2")

    num_experts = w13.shape[0]
    ids = topk_ids.long()
    valid = (ids >= 0) & (ids < num_experts)
    rows, slots = torch.nonzero(valid, as_tuple=True)  # [P] each, token-major
    experts = ids[rows, slots]  # [P]

    x = hidden.float()
    if apply_router_weight_on_input:
        x = x * topk_weights.float()
    x = _fake_quantize(x, a1_spec)  # [M, H]
    h = _grouped_matmul(x[rows], experts, w13)  # [P, 2I]
    if b13 is not None:
        h = h + b13.float()[experts]
    inter = _fake_quantize(apply_activation(h, act), a2_spec)  # [P, I]
    y = _grouped_matmul(inter, experts, w2)  # [P, H]
    if b2 is not None:
        y = y + b2.float()[experts]
    if not apply_router_weight_on_input:
        y = y * topk_weights.float()[rows, slots].unsqueeze(1)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    out.index_add_(0, rows, y)  # [M, H]
    return out.to(hidden.dtype)


def _fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """x [P, K] float32 → the float32 values a kernel's fp8 operand represents."""
    q, scale = quantize(x, spec)
    return dequantize(q, scale, spec)


def _grouped_matmul(x: torch.Tensor, experts: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """Row p of the result is x[p] @ dequantised w[experts[p]]ᵀ; [P, K] → [P, N] float32.

    Experts are dequantised one at a time, so the reference's memory stays at one expert's
    float32 weight even for the largest layers.
    """
    out = x.new_zeros(x.shape[0], w.shape[1])  # [P, N]
    for e in torch.unique(experts).tolist():
        (sel,) = torch.nonzero(experts == e, as_tuple=True)
        out[sel] = x[sel] @ w.dequantize(expert=e).T
    return out


def _input_spec(spec: QuantSpec, w: QuantizedWeight, name: str) -> QuantSpec:
    """The activation spec of the GEMM that `w` computes, with its static scale if any."""
    if spec.dynamic:
        return spec
    if w.input_scale is None:
        raise ValueError(
            f"{name}: the scheme's activations are static, so {name}.input_scale is needed"
        )
    return spec.with_scale(w.input_scale)


def _check_args(hidden, w13, w2, topk_ids, topk_weights, scheme, act, b13, b2):
    """Validate types and shapes; errors name the argument."""
    check_tensor("hidden", hidden, ndim=2, dtypes=(*FLOAT_DTYPES, torch.float64))
    device = hidden.device
    check_quantized_weights(w13, w2, scheme.weight, device)
    num_tokens, hidden_size = hidden.shape
    num_experts, _, inter = w2.shape
    check_shape("w2", w2.q, (num_experts, hidden_size, inter), "[E, H, I] with H of hidden")
    check_shape(
        "w13", w13.q, (num_experts, act.gemm1_rows(inter), hidden_size),
        f"[E, {'2I' if act.gated else 'I'}, H] with E and I of w2 and H of hidden",
    )
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32, torch.int64), device=device)
    check_tensor("topk_weights", topk_weights, ndim=2, device=device)
    if topk_ids.shape[0] != num_tokens:
        raise ValueError(
            f"topk_ids: expected shape ({num_tokens}, k), got {tuple(topk_ids.shape)}"
        )
    check_shape("topk_weights", topk_weights, tuple(topk_ids.shape), "the shape of topk_ids")
    if b13 is not None:
        check_tensor("b13", b13, ndim=2, device=device)
        check_shape("b13", b13, (num_experts, w13.shape[1]), "[E, rows of w13]")
    if b2 is not None:
        check_tensor("b2", b2, ndim=2, device=device)
        check_shape("b2", b2, (num_experts, hidden_size), "[E, H]")

