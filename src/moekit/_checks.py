"""Argument checks shared by the public ops: clear errors that name the argument."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise TypeError/ValueError unless `value` is a tensor of the expected kind."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(
            f"{name}: expected a {ndim}-d tensor, got shape {tuple(value.shape)}"
        )
    if device is not None and value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {value.device}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int], what: str) -> None:
    """Raise ValueError unless `value.shape == expected`; `what` explains the expectation."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(
            f"{name}: expected shape {tuple(expected)} ({what}), got {tuple(value.shape)}"
        )


INT_IDS = (torch.int32, torch.int64)
# Router weights: float64 too (a float64 router's, a test's), narrowed by the experts ops
# before their kernels (`narrow_weights`).
WEIGHT_DTYPES = (*FLOAT_DTYPES, torch.float64)


def check_router(router_logits, num_experts: int, top_k, expert_map) -> None:
    """The router's side of `fused_moe` and `fused_moe_fp8`: logits [M, E] over the
    experts the router chooses among (E_global, `expert_map`'s length, with a map), and
    1 ≤ top_k ≤ that many."""
    check_tensor("router_logits", router_logits, ndim=2, dtypes=FLOAT_DTYPES)
    routed = num_experts if expert_map is None else expert_map.numel()
    if router_logits.shape[1] != routed:
        what = "E of w13" if expert_map is None else "E_global, expert_map's length"
        raise ValueError(
            f"router_logits: expected {routed} columns ({what}), "
            f"got shape {tuple(router_logits.shape)}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= routed:
        raise ValueError(f"top_k: expected an int in [1, {routed}] (routed experts), "
                         f"got {top_k!r}")


def output_like(hidden: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`out` checked to be a contiguous tensor like `hidden`, or a new one."""
    if out is None:
        return torch.empty_like(hidden, memory_format=torch.contiguous_format)
    check_tensor("out", out, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    check_shape("out", out, tuple(hidden.shape), "the shape of hidden")
    if not out.is_contiguous():
        raise ValueError("out: expected a contiguous tensor")
    return out


def check_routed_experts(hidden, w13, w2, topk_ids, topk_weights, act, b13, b2):
    """Shapes shared by the experts ops, routing dtypes, biases (ids and weights are
    converted by the op once its path is known: `moekit._topk_cast`).

    `w13` [E, 2I or I, H] and `w2` [E, H, I] are the weight tensors themselves (their
    dtypes are the caller's to check: 16-bit for `fused_experts`, fp8 for the fp8 path);
    `act` is the `Activation`, which says whether w13 holds a gate.
    """
    device = hidden.device
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INT_IDS, device=device)
    check_tensor("topk_weights", topk_weights, ndim=2, dtypes=WEIGHT_DTYPES, device=device)
    num_tokens, hidden_size = hidden.shape
    num_experts, _, inter = w2.shape
    check_shape("w2", w2, (num_experts, hidden_size, inter), "[E, H, I] with H of hidden")
    check_shape(
        "w13", w13, (num_experts, act.gemm1_rows(inter), hidden_size),
        f"[E, {'2I' if act.gated else 'I'}, H] with E and I of w2 and H of hidden",
    )
    if num_experts == 0:  # the kernels' plan needs an expert; E = 0 has nothing to compute
        raise ValueError(
            f"w13, w2: expected at least one expert, got E = 0 (w2 of shape {tuple(w2.shape)})"
        )
    if topk_ids.shape[0] != num_tokens or topk_ids.shape[1] < 1:
        raise ValueError(
            f"topk_ids: expected shape ({num_tokens}, k) with k ≥ 1, got {tuple(topk_ids.shape)}"
        )
    check_shape("topk_weights", topk_weights, tuple(topk_ids.shape), "the shape of topk_ids")
    if b13 is not None:
        check_tensor("b13", b13, ndim=2, dtypes=FLOAT_DTYPES, device=device)
        check_shape("b13", b13, (num_experts, w13.shape[1]), "[E, rows of w13]")
    if b2 is not None:
        check_tensor("b2", b2, ndim=2, dtypes=FLOAT_DTYPES, device=device)
        check_shape("b2", b2, (num_experts, hidden_size), "[E, H]")


def narrow_weights(topk_weights: torch.Tensor) -> torch.Tensor:
    """float64 router weights as float32, which the kernels read (they take 16- and 32-bit
    weights as they are); others unchanged. A float64 call then runs in full each time
    (a conversion is not replayed: `moekit._replay`), which a rare dtype can afford."""
    if topk_weights.dtype == torch.float64:
        return topk_weights.float()
    return topk_weights


def dense_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A bias whose rows the kernels can read as [E, N] with unit column stride.

    The kernels take a bias's expert stride only; a strided view (a slice of a wider
    tensor, a transpose) is copied, which costs E·N elements, not a weight's E·N·K.
    """
    return None if bias is None else bias.contiguous()


def dense_weight(name: str, weight: torch.Tensor) -> torch.Tensor:
    """`weight`, or its contiguous copy with a warning: the copy is made on every call.

    A strided view of a checkpoint (`w2.transpose(1, 2)`) reads correctly but costs a
    whole copy of the experts' weights per call; `.contiguous()` once, where weights
    load, removes it (the `MoE` layer and the transformers integration do so).
    """
    if weight.is_contiguous():
        return weight
    warnings.warn(
        f"{name}: not contiguous (strides {tuple(weight.stride())}), so every call copies "
        f"its {weight.numel() * weight.element_size() / 2**20:.1f} MiB; pass "
        f"{name}.contiguous() once instead", stacklevel=2)
    return weight.contiguous()


def check_fp8_weight_on_input(apply_router_weight_on_input: bool, top_k: int) -> None:
    """fp8 experts take the router weight on their input only for top-1 routing."""
    if apply_router_weight_on_input and top_k != 1:
        raise ValueError(
            "apply_router_weight_on_input: fp8 experts support it for top_k = 1 only "
            f"(each pair would need a quantised row of its own), got top_k = {top_k}")
