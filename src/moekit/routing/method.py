"""How router logits become top-k expert choices, described as a value.

A `Routing` fixes the scoring function, the order of scoring and selection, expert
groups, renormalisation and the routed scaling factor. The string names are shortcuts:

    "softmax"       softmax over E, top-k, renormalise            (Qwen-MoE, OLMoE, ...)
    "sigmoid"       sigmoid, top-k, renormalise                   (with top_k=1 and
                    renormalize=False: Llama-4's sigmoid(top-1 logit))
    "topk_softmax"  top-k of the logits, softmax over the k       (Mixtral, gpt-oss)

DeepSeek-V3 / Kimi-K2 routing is "sigmoid" with `n_group`, `topk_group`,
`routed_scaling_factor` and a score-correction bias (given to `route`, a tensor).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moekit._checks import FLOAT_DTYPES, check_shape, check_tensor

SCORINGS = ("softmax", "sigmoid")
ORDERS = ("score_then_topk", "topk_then_score")

# Packed top-k holds the id in the high 16 bits of an int32, so ids must be < 2**15.
MAX_EXPERTS = 2**15


@dataclass(frozen=True)
class Routing:
    """One routing method.

    Attributes:
        scoring: "softmax" (over the E experts) or "sigmoid" (per expert).
        order: "score_then_topk" (score all E, select k) or "topk_then_score" (select k
            logits, then score only those: softmax over the k). With sigmoid both orders
            give the same result.
        renormalize: divide the k weights by their sum (+1e-20, so an all-zero row stays 0).
        n_group: experts form `n_group` contiguous groups of E / n_group (1: no groups).
        topk_group: groups kept per token, ranked by the sum of their top-2 selection
            scores; experts are chosen only from kept groups.
        routed_scaling_factor: final multiplier of the weights.
    """

    scoring: str = "softmax"
    order: str = "score_then_topk"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring: expected one of {SCORINGS}, got {self.scoring!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order: expected one of {ORDERS}, got {self.order!r}")
        if not isinstance(self.n_group, int) or self.n_group < 1:
            raise ValueError(f"n_group: expected an int >= 1, got {self.n_group!r}")
        if not isinstance(self.topk_group, int) or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(
                f"topk_group: expected an int in [1, n_group={self.n_group}], "
                f"got {self.topk_group!r}"
            )
        if self.order == "topk_then_score" and self.n_group > 1:
            raise ValueError("n_group: groups need order='score_then_topk'")

    @property
    def softmax_over_topk(self) -> bool:
        """True when the weights are a softmax over the k selected logits."""
        return self.order == "topk_then_score" and self.scoring == "softmax"

    def selects_on_logits(self, has_bias: bool) -> bool:
        """True when experts are ranked by their raw logits.

        Scoring is monotone, so ranking logits ranks scores, and the chosen ids then do
        not depend on how exp() rounds. A bias or group sums need the scores themselves.
        """
        return self.order == "topk_then_score" or (not has_bias and self.n_group == 1)

    @classmethod
    def parse(cls, method: str | Routing, **overrides: object) -> Routing:
        """A `Routing` from a preset name or value; `overrides` that are not None replace fields."""
        if isinstance(method, str):
            if method not in PRESETS:
                raise ValueError(f"method: expected one of {tuple(PRESETS)}, got {method!r}")
            method = PRESETS[method]
        elif not isinstance(method, Routing):
            raise TypeError(f"method: expected a str or Routing, got {type(method).__name__}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(method, **changes) if changes else method


PRESETS: dict[str, Routing] = {
    "softmax": Routing("softmax", "score_then_topk", renormalize=True),
    "sigmoid": Routing("sigmoid", "score_then_topk", renormalize=True),
    # The k weights already sum to 1.
    "topk_softmax": Routing("softmax", "topk_then_score", renormalize=False),
}


def check_route_args(
    router_logits: object,
    top_k: object,
    routing: Routing,
    e_score_correction_bias: object,
    *,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> None:
    """Raise TypeError/ValueError, naming the argument, unless the routing call is valid.

    Only shapes, dtypes and devices are read (never data), so this is CUDA-graph safe.
    """
    logits = check_tensor("router_logits", router_logits, ndim=2, dtypes=dtypes)
    num_experts = logits.shape[1]
    if num_experts < 1:
        raise ValueError("router_logits: expected at least one expert (E >= 1), got E = 0")
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"router_logits: at most {MAX_EXPERTS} experts, got E = {num_experts}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k: expected an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected 1 <= top_k <= E = {num_experts}, got {top_k}")
    if num_experts % routing.n_group:
        raise ValueError(f"n_group: {routing.n_group} does not divide E = {num_experts}")
    kept = routing.topk_group * (num_experts // routing.n_group)
    if top_k > kept:
        raise ValueError(
            f"top_k: {top_k} exceeds the {kept} experts in the topk_group="
            f"{routing.topk_group} kept groups"
        )
    if e_score_correction_bias is not None:
        if routing.order == "topk_then_score":
            raise ValueError("e_score_correction_bias: needs order='score_then_topk'")
        bias = check_tensor(
            "e_score_correction_bias", e_score_correction_bias, ndim=1, dtypes=dtypes,
            device=logits.device,
        )
        check_shape("e_score_correction_bias", bias, (num_experts,), "one per expert")
