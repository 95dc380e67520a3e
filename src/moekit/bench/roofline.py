"""The roofline of one fused-experts call (PERF.md, "The roofline").

A call must at least read the weights of every expert the routing hits, read
`hidden` once and write `out` once; intermediates are the implementation's choice and
stay out of the floor. It must also do the GEMM flops of every (token, slot) pair.
The floor is the larger of the two lower bounds, each against a ceiling measured in
the same run, and roofline % = floor ÷ measured time is the headline figure.

    bytes = experts_hit · expert_bytes + M·H·act_bytes (hidden) + M·H·act_bytes (out)
    flops = 2 · M · k · (rows13·H + I·H)        rows13 = 2I gated, I for relu2
"""

from __future__ import annotations

from dataclasses import dataclass


def expert_bytes(hidden: int, inter: int, gemm1_rows: int, weight_bytes: float,
                 bias: bool = False, bias_bytes: float = 2.0) -> float:
    """Bytes of one expert's weights: w13 [rows13, H] + w2 [H, I] (+ b13 [rows13] + b2 [H]).

    Args:
        hidden: H. inter: I. gemm1_rows: rows of w13 (2I gated, I for relu2).
        weight_bytes: bytes per weight element (2 for bf16/fp16; scales are added by
            quantised formats when they exist).
        bias: whether b13 and b2 are present; bias_bytes: bytes per bias element.
    Returns:
        bytes (float, so sub-byte formats can use fractional element sizes).
    """
    total = (gemm1_rows * hidden + hidden * inter) * weight_bytes
    if bias:
        total += (gemm1_rows + hidden) * bias_bytes
    return total


@dataclass(frozen=True)
class Cost:
    """The unavoidable work of one call: `bytes` moved and `flops` computed."""

    bytes: float
    flops: float

    def floor_us(self, mem_GBps: float, matmul_TFLOPs: float) -> float:
        """max(bytes ÷ bandwidth, flops ÷ peak) in µs."""
        return max(self.memory_us(mem_GBps), self.compute_us(matmul_TFLOPs))

    def memory_us(self, mem_GBps: float) -> float:
        return self.bytes / (mem_GBps * 1e3)  # GB/s = 1e3 bytes/µs

    def compute_us(self, matmul_TFLOPs: float) -> float:
        return self.flops / (matmul_TFLOPs * 1e6)  # TFLOP/s = 1e6 flop/µs

    def bound(self, mem_GBps: float, matmul_TFLOPs: float) -> str:
        """"memory" or "compute": which side sets the floor."""
        memory = self.memory_us(mem_GBps) >= self.compute_us(matmul_TFLOPs)
        return "memory" if memory else "compute"


def moe_cost(num_tokens: int, top_k: int, hidden: int, inter: int, gemm1_rows: int,
             experts_hit: int, weight_bytes: float, act_bytes: float,
             bias: bool = False, bias_bytes: float | None = None) -> Cost:
    """The roofline cost of `fused_experts` for one routing.

    Args:
        num_tokens: M. top_k: k. hidden: H. inter: I. gemm1_rows: rows of w13 per expert.
        experts_hit: distinct experts that at least one (token, slot) pair uses.
        weight_bytes: bytes per weight element (scales of quantised formats spread over
            the elements); act_bytes: bytes per hidden/out element.
        bias: whether the experts carry b13 and b2; bias_bytes: bytes per bias element
            (default: weight_bytes, biases stored like the weights).
    Returns:
        Cost(bytes, flops).
    """
    bias_bytes = weight_bytes if bias_bytes is None else bias_bytes
    weights = experts_hit * expert_bytes(hidden, inter, gemm1_rows, weight_bytes, bias,
                                         bias_bytes=bias_bytes)
    activations = 2 * num_tokens * hidden * act_bytes  # hidden read once, out written once
    flops = 2 * num_tokens * top_k * (gemm1_rows * hidden + inter * hidden)
    return Cost(bytes=weights + activations, flops=float(flops))


def achieved(cost: Cost, time_us: float) -> tuple[float, float]:
    """(GB/s, TFLOP/s) of a call that took `time_us` µs."""
    return cost.bytes / time_us / 1e3, cost.flops / time_us / 1e6
