"""Expert activations as values.

An `Activation` names the nonlinearity between the two expert GEMMs and carries its
constants, so kernels and the reference agree on one description instead of flags.
Gated activations read GEMM1's output as two halves, gate (rows 0..I-1 of `w13`) and
up (rows I..2I-1), and produce I columns; `relu2` has no gate and `w13` holds I rows.

    silu        silu(gate) * up                                   (SwiGLU)
    gelu        gelu(gate) * up, exact erf form                   (GeGLU)
    gelu_tanh   gelu(gate) * up, tanh approximation
    swigluoai   gpt-oss: g = min(gate, limit), u = clamp(up, -limit, limit),
                (u + 1) * g * sigmoid(alpha * g)
    relu2       relu(x) ** 2, no gate
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("silu", "gelu", "gelu_tanh", "swigluoai", "relu2")


@dataclass(frozen=True)
class Activation:
    """One expert activation and its constants (only `swigluoai` uses alpha/limit)."""

    kind: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"activation: expected one of {KINDS}, got {self.kind!r}")

    @property
    def gated(self) -> bool:
        """True when GEMM1 produces gate and up halves (2I columns) for I outputs."""
        return self.kind != "relu2"

    def gemm1_rows(self, intermediate_size: int) -> int:
        """Rows of `w13` per expert for this activation: 2I when gated, else I."""
        return 2 * intermediate_size if self.gated else intermediate_size

    @classmethod
    def parse(cls, value: str | Activation) -> Activation:
        """Accept an `Activation` or its name."""
        if isinstance(value, Activation):
            return value
        if not isinstance(value, str):
            raise TypeError(f"activation: expected a str or Activation, got {type(value).__name__}")
        return cls(value)
