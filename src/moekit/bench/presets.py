"""The model registry: every benchmark takes its MoE shapes from here.

The seven presets are PERF.md's table (E experts, top-k, hidden H, intermediate I,
activation). Keeping them in one place means the kernel table, the tuner and any
later model benchmark agree on what "qwen3-30b-a3b" means. `EXTRA_PRESETS` holds
variants that are useful for comparisons but are not part of the headline table.

On a machine without CUDA the table runs scaled-down copies (`cpu_preset`) so the
harness itself can be exercised in seconds; those numbers mean nothing for speed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moekit.activation import Activation

# PERF.md, "Presets": token counts of the table, decode (M ≤ 64) through prefill.
TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
CPU_TOKEN_COUNTS = (1, 16, 64)


@dataclass(frozen=True)
class Preset:
    """One MoE layer shape.

    Attributes:
        name: registry key, e.g. "qwen3-30b-a3b".
        num_experts: E. top_k: k. hidden: H. inter: I (per-expert intermediate size).
        activation: name of the `moekit.Activation` between the GEMMs.
        bias: whether the layer has b13 [E, 2I] and b2 [E, H] (gpt-oss does).
    """

    name: str
    num_experts: int
    top_k: int
    hidden: int
    inter: int
    activation: str = "silu"
    bias: bool = False

    def __post_init__(self) -> None:
        Activation.parse(self.activation)  # rejects unknown names early
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"{self.name}: top_k {self.top_k} not in [1, {self.num_experts}]")

    @property
    def gemm1_rows(self) -> int:
        """Rows of w13 per expert: 2I for gated activations, I for relu2."""
        return Activation.parse(self.activation).gemm1_rows(self.inter)


def _registry(*presets: Preset) -> dict[str, Preset]:
    return {p.name: p for p in presets}


# PERF.md, "Presets (E, top-k, H, I)". gpt-oss runs its own clamped SwiGLU with biases.
PRESETS = _registry(
    Preset("mixtral-8x7b", 8, 2, 4096, 14336),
    Preset("deepseek-v2-lite", 64, 6, 2048, 1408),
    Preset("qwen3-30b-a3b", 128, 8, 2048, 768),
    Preset("olmoe-1b-7b", 64, 8, 2048, 1024),
    Preset("granite-3.0-3b-a800m", 40, 8, 1536, 512),
    Preset("gpt-oss-120b", 128, 4, 2880, 2880, activation="swigluoai", bias=True),
    Preset("deepseek-v3", 256, 8, 7168, 2048),
)

# Not in the default table. gpt-oss-120b-silu is the shape PERF.md's vLLM numbers to
# beat were measured with (silu, no biases), for a like-for-like comparison;
# gpt-oss-120b-tp8 one GPU's shard of 8-way tensor parallelism (I = 2880 / 8 = 360, rows
# that are a multiple of 8 elements but not of 16).
EXTRA_PRESETS = _registry(
    Preset("gpt-oss-120b-silu", 128, 4, 2880, 2880),
    Preset("gpt-oss-120b-tp8", 128, 4, 2880, 360, activation="swigluoai", bias=True),
)

ALL_PRESETS = {**PRESETS, **EXTRA_PRESETS}


def get_preset(name: str) -> Preset:
    """Look a preset up by name; the error lists the known names."""
    try:
        return ALL_PRESETS[name]
    except KeyError:
        known = ", ".join(ALL_PRESETS)
        raise KeyError(f"unknown preset {name!r} (known: {known})") from None


def cpu_preset(preset: Preset) -> Preset:
    """A small copy of `preset` for the CPU table: E ≤ 16, H and I about 1/32 (multiples of 16).

    The activation, bias and top-k (capped at E) are kept, so every code path of the
    full preset still runs; only the sizes shrink.
    """
    experts = min(preset.num_experts, 16)

    def shrink(n: int) -> int:
        return max(16, -(-(n // 32) // 16) * 16)

    return replace(
        preset,
        name=preset.name,
        num_experts=experts,
        top_k=min(preset.top_k, experts),
        hidden=shrink(preset.hidden),
        inter=shrink(preset.inter),
    )
