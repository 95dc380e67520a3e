"""Memory-bound small M (4–64 tokens): the direct path past 4 tokens, and wider 16-row tiles.

PERF.md's vLLM protocol on the H200 (session 27, `h200-20261203-kernels-bf16-vllm-protocol-s27.md`)
left moekit behind vLLM at M = 8 on mixtral, deepseek-v2-lite and olmoe. Two candidates,
both from `moekit tune`'s kept trials (`h200-fused_experts-bf16.json`):

- the direct path (no plan, the combine fused into GEMM2), which the heuristic takes only
  up to 4 tokens (H100, before GEMM2 split a token's slots: 0.81–0.98× the plan path at
  M = 8 on five of seven presets); tuned for qwen3 at M = 8 it won 1.086× on the H200;
- 16-row blocks with the 32-row blocks' 128 × 128 tiles in 3 stages instead of 64 × 128 in
  4: mixtral's best trial at M = 8 and 32 (1.05×), within ~1% elsewhere.

Times the whole `fused_experts` call with the configuration it takes today (tuned table
or heuristic), the direct path at its heuristic tiles, and (where the row tile is 16) the
same row tile with 128 × 128 × 3 tiles; graph replay, L2 read-flushed, four rounds in
rotated order; relative difference of each output to the shipped one's. The wide tiles
were adopted (`moekit.tuning.heuristic.wide_16_row_tiles`, bench/NOTES.md session 27):
from then on "shipped" is already wide where that rule applies, and only the direct path
is compared there.

    PYTHONPATH=src python3 bench/scripts/small_m_experiment.py --out $OUT
"""

from __future__ import annotations

import sys

import torch
from half_tile_experiment import run_cells  # this directory: the command line and rows

import moekit
from moekit._tma import use_tma
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS, Preset
from moekit.bench.timing import graph_replay_us
from moekit.dispatch import dispatch_plan
from moekit.experts import _select_config, launch_gemm1, launch_gemm2
from moekit.tuning.config import ExpertsConfig
from moekit.tuning.heuristic import direct_tiles, tiles_for_block_m

PRESET_NAMES = ("mixtral-8x7b", "deepseek-v2-lite", "olmoe-1b-7b", "qwen3-30b-a3b",
                "gpt-oss-120b", "granite-3.0-3b-a800m", "deepseek-v3")
CELLS = [(name, m) for name in PRESET_NAMES for m in (6, 8, 12, 16, 32, 64)]
# Mixtral's tensor-parallel shards (--cells NAME:M): few experts, shorter GEMM2 rows.
SHARDS = {p.name: p for p in (Preset("mixtral-8x7b/tp2", 8, 2, 4096, 7168),
                              Preset("mixtral-8x7b/tp4", 8, 2, 4096, 3584),
                              Preset("mixtral-8x7b/tp8", 8, 2, 4096, 1792))}
WIDE_16 = tiles_for_block_m(16, wide_16=True).gemm1  # 128 × 128 in 3 stages
# The direct path reads an expert's weights once per pair: timed up to 16 tokens, and up to
# 8 on mixtral (8 experts of 352 MB, each hit by several tokens).
DIRECT_MAX_M = (8, 16)


def run_cell(name: str, m: int, log) -> dict:
    preset = SHARDS.get(name) or PRESETS[name]
    dev = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, dev)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, dev)
    configs = {"shipped": _select_config(hidden, preset.num_experts, preset.top_k,
                                         preset.inter)}
    if not configs["shipped"].direct and m <= DIRECT_MAX_M[preset.num_experts > 8]:
        configs["direct"] = direct_tiles(m, preset.top_k, preset.hidden)
    if configs["shipped"].block_m == 16 and configs["shipped"].gemm1 != WIDE_16:
        configs["wide16"] = ExpertsConfig(16, WIDE_16, WIDE_16)
    if len(configs) == 1:
        log(f"{name} M={m}: nothing to compare ({configs['shipped'].as_ints()})")
        return {}

    def layer(config):
        return moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights, b13=w.b13,
                                    b2=w.b2, activation=preset.activation, config=config)

    ref = layer(configs["shipped"]).float()
    row = {"preset": name, "M": m, **{f"{k}_config": c.as_ints() for k, c in configs.items()}}
    for label, config in configs.items():
        out = layer(config).float()
        row[f"{label}_rel_diff"] = float((out - ref).norm() / ref.norm())
    labels = list(configs)
    for r in range(4):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            row.setdefault(f"{label}_us", []).append(
                graph_replay_us(lambda c=configs[label]: layer(c)))
    if "wide16" in configs:
        row.update(gemms_alone(preset, w, hidden, topk, configs["shipped"], configs["wide16"]))
    best = {label: min(row[f"{label}_us"]) for label in labels}
    log(f"{name} M={m}: " + ", ".join(
        f"{label} {best[label]:.1f} µs ({best['shipped'] / best[label]:.3f}×, diff "
        f"{row[f'{label}_rel_diff']:.1e})" for label in labels)
        + f"; shipped {configs['shipped'].as_ints()}"
        + "".join(f"; {g} {min(row[f'{g}_shipped_us']):.1f} → {min(row[f'{g}_wide16_us']):.1f}"
                  for g in ("gemm1", "gemm2") if f"{g}_shipped_us" in row))
    return row


def gemms_alone(preset, w, hidden, topk, shipped: ExpertsConfig, wide: ExpertsConfig) -> dict:
    """GEMM1 and GEMM2 alone (one plan at the shared row tile) at both configurations' tiles,
    two rounds each, graph replay: which GEMM the wide tiles change."""
    ids, weights = topk.ids.to(torch.int32), topk.weights.float().reshape(-1)
    plan = dispatch_plan(ids, preset.num_experts, shipped.block_m, backend="triton")
    tma = use_tma(hidden, w.w13, w.w2, shipped.block_m)
    ints = {"shipped": shipped.as_ints(), "wide16": wide.as_ints()}
    inter = launch_gemm1(hidden, w.w13, w.b13, weights, plan, preset.activation, 1.702, 7.0,
                         False, ints["shipped"][1:6], tma)
    out = {}
    for _ in range(2):
        for label, c in ints.items():
            out.setdefault(f"gemm1_{label}_us", []).append(graph_replay_us(
                lambda c=c: launch_gemm1(hidden, w.w13, w.b13, weights, plan, preset.activation,
                                         1.702, 7.0, False, c[1:6], tma)))
            out.setdefault(f"gemm2_{label}_us", []).append(graph_replay_us(
                lambda c=c: launch_gemm2(inter, w.w2, w.b2, weights, plan, True, c[6:11], tma)))
    return out


if __name__ == "__main__":
    sys.exit(run_cells("small-m-experiment", CELLS, run_cell))
