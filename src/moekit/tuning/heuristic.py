"""The default tile configuration: an analytic guess that is good without tables.

The row tile follows the expected rows per active expert (M·k spread over
min(E, M·k) experts): small tiles for decode, where every program streams its own
weight tile and padding rows are wasted work; large tiles for prefill, where the GEMMs
are compute-bound and need big tiles to feed the tensor cores.
"""

from __future__ import annotations

from moekit.tuning.config import ExpertsConfig, GemmConfig


def rows_per_expert(num_tokens: int, num_experts: int, top_k: int) -> float:
    """Average rows an active expert receives under balanced routing."""
    pairs = num_tokens * top_k
    return pairs / max(1, min(num_experts, pairs))


def default_config(
    num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, dtype_bytes: int = 2
) -> ExpertsConfig:
    """Pick tiles for `fused_experts` on M tokens routed k-of-E, hidden H, intermediate I."""
    rows = rows_per_expert(num_tokens, num_experts, top_k)
    block_k = 128 if dtype_bytes <= 2 else 64
    if rows <= 16:
        return ExpertsConfig(
            16, GemmConfig(64, block_k, 1, 4, 4), GemmConfig(64, block_k, 1, 4, 4)
        )
    if rows <= 32:
        return ExpertsConfig(
            32, GemmConfig(64, block_k, 1, 4, 4), GemmConfig(64, block_k, 1, 4, 4)
        )
    if rows <= 96:
        return ExpertsConfig(
            64, GemmConfig(64, 64, 8, 4, 4), GemmConfig(128, 64, 8, 4, 4)
        )
    return ExpertsConfig(128, GemmConfig(64, 64, 8, 8, 4), GemmConfig(128, 64, 8, 8, 4))
