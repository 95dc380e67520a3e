"""Experiment: the narrow-layer rule (`moekit.tuning.heuristic.narrow_layer`) against the
heuristic without it, on granite's 40 experts of I = 512 at every memory-bound token count.

Prediction (session 18, from `moekit tune`'s kept trials on the H200): 128 × 64 tiles in 3
stages (two GEMM1 programs per SM instead of one) at a smaller row tile are 1.07–1.16×
faster at M = 16–128, within ~1.5% of the best of 39 configurations there. A first rule
(the usual row tile halved; 63231d8) measured 1.07–1.20× at M = 16–64 and 128 but 0.97×
at M = 96 and 0.80× at M = 192–256, where 64-row wide tiles stay best; the rule now sizes
the row tile to the average expert's rows and keeps the usual tiles past 32 rows. Each
cell times, in interleaved rounds, the session's starting heuristic ("old"), the rule
("new"), and the neighbours (row tiles 16/32/64 with the narrow or the usual tiles,
128-row prefill tiles from M = 192), by CUDA-graph replay of the whole `fused_experts`
with L2 read-flushed; every output is checked against the old rule's (relative L2).
Controls that must not fire: olmoe M = 256, qwen3 M = 8.

`--fp8`: the fp8 rule (`moekit.experts_fp8.narrow_fp8_config`, from `moekit tune` at granite
M = 16 / 64 / 128: 1.07–1.30× there) against the plan path's tiles, three schemes, granite
M = 8–192, qwen3 M = 64 as the control; old and new only.

`--tp`: bf16 layers sharded by tensor parallelism (I split over GPUs), which the rule also
calls narrow though none was measured: mixtral over 8 GPUs (I = 1792: 112 column tiles of
128), qwen3 and olmoe over 4 (I = 192 and 256); old, new, and the row tiles' usual,
narrow and 64-column narrow tiles.

    PYTHONPATH=src python3 bench/scripts/narrow_layer_experiment.py --out $OUT [--fp8 | --tp]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys

import torch
import triton

import moekit
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS, Preset
from moekit.bench.timing import graph_replay_us
from moekit.experts_fp8 import default_fp8_config, plan_fp8_config
from moekit.tuning.config import ExpertsConfig, GemmConfig
from moekit.tuning.heuristic import default_config, pick_block_m, tiles_for_block_m

GRANITE = "granite-3.0-3b-a800m"
CELLS = [(GRANITE, m) for m in (8, 16, 32, 48, 64, 96, 128, 144, 160, 176, 192, 256, 320)] + [
    ("olmoe-1b-7b", 256), ("qwen3-30b-a3b", 8)]
FP8_CELLS = [(GRANITE, m, scheme) for scheme in ("fp8_tensor", "fp8_channel", "fp8_block")
             for m in (8, 16, 32, 64, 96, 128, 160, 192)] + [("qwen3-30b-a3b", 64, "fp8_tensor")]
NARROW = GemmConfig(128, 64, 8, 4, 3)
# Tensor-parallel shards: (preset, token counts).
TP_SHARDS = [(Preset("mixtral-8x7b/tp8", 8, 2, 4096, 1792), (8, 32, 64, 128, 256)),
             (Preset("qwen3-30b-a3b/tp4", 128, 8, 2048, 192), (8, 64, 256, 512)),
             (Preset("olmoe-1b-7b/tp4", 64, 8, 2048, 256), (8, 64, 256))]


def variants(preset, m: int) -> dict[str, ExpertsConfig]:
    """name → configuration timed at this cell."""
    shape = (preset.num_experts, preset.top_k, preset.hidden, preset.inter)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = {"old": tiles_for_block_m(pick_block_m(m, *shape[:2])),
           "new": default_config(m, *shape, num_sms=sms)}
    for bm in (16, 32, 64):
        out[f"bm{bm} narrow"] = ExpertsConfig(bm, NARROW, NARROW)
        out[f"bm{bm} usual"] = tiles_for_block_m(bm)
    out["bm32 narrow+g2 128x128"] = ExpertsConfig(32, NARROW, GemmConfig(128, 128, 8, 4, 3))
    if m >= 192:
        out["bm128"] = tiles_for_block_m(128)
    if preset.name.split("/")[-1].startswith("tp"):
        for bm in (16, 32):
            out[f"bm{bm} narrow 64 columns"] = ExpertsConfig(bm, GemmConfig(64, 64, 8, 4, 3),
                                                             GemmConfig(64, 64, 8, 4, 3))
    return out


def fp8_variants(preset, m: int, scheme: str) -> dict[str, ExpertsConfig]:
    """The fp8 plan path's tiles ("old") and the heuristic's ("new")."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return {"old": plan_fp8_config(m, preset.num_experts, preset.top_k, scheme),
            "new": default_fp8_config(m, preset.num_experts, preset.top_k, preset.hidden,
                                      preset.inter, scheme, sms)}


def run_cell(name: str, m: int, rounds: int, scheme: str | None = None) -> list[dict]:
    """Every variant of one cell, timed in `rounds` interleaved rounds (fp8 with `scheme`)."""
    preset = PRESETS.get(name) or next(p for p, _ in TP_SHARDS if p.name == name)
    device = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, device)
    if scheme:
        w = quantize_experts(w, scheme)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, device)
    configs = fp8_variants(preset, m, scheme) if scheme else variants(preset, m)

    def call(config, out):
        if scheme:
            return moekit.fused_experts_fp8(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                            scheme=scheme, activation=preset.activation,
                                            b13=w.b13, b2=w.b2, config=config, out=out)
        return moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                    activation=preset.activation, b13=w.b13, b2=w.b2,
                                    config=config, out=out)
    outs = {}
    for label, config in configs.items():
        outs[label] = torch.full_like(hidden, float("nan"))
        call(config, outs[label])
    times = {label: [] for label in configs}
    for _ in range(rounds):
        for label, config in configs.items():
            times[label].append(graph_replay_us(lambda c=config, o=outs[label]: call(c, o)))
    ref = outs["old"].float()
    rows = []
    for label, config in configs.items():
        err = ((outs[label].float() - ref).norm() / ref.norm()).item()
        row = {"preset": name, "M": m, "scheme": scheme or "bf16", "variant": label,
               "config": dataclasses.asdict(config),
               "us": statistics.median(times[label]), "rounds_us": times[label],
               "rel_diff_vs_old": err}
        rows.append(row)
        print(f"{name} M={m} {scheme or 'bf16'} {label:22s} {row['us']:8.1f} µs  "
              f"diff {err:.1e}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fp8", action="store_true", help="the fp8 rule (FP8_CELLS)")
    parser.add_argument("--tp", action="store_true", help="tensor-parallel shards (TP_SHARDS)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cells = [(name, m, None) for name, m in CELLS]
    if args.fp8:
        cells = FP8_CELLS
    elif args.tp:
        cells = [(p.name, m, None) for p, ms in TP_SHARDS for m in ms]
    rows = []
    for name, m, scheme in cells:
        rows += run_cell(name, m, args.rounds, scheme)
        torch.cuda.empty_cache()
    stem = "narrow-layer-experiment" + ("-fp8" if args.fp8 else "-tp" if args.tp else "")
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.date.today().isoformat(),
            "git": os.environ.get("MOEKIT_GIT_COMMIT", "?"), "command": " ".join(sys.argv)}
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write("# Narrow-layer rule, " + meta["device"] + ", " + meta["date"] + "\n\n")
        f.write("".join(f"- {k}: {v}\n" for k, v in meta.items() if k not in ("device", "date")))
        f.write("- CUDA-graph replay of `fused_experts`, L2 read-flushed, median of "
                f"{args.rounds} interleaved rounds (each a median of samples)\n\n")
        f.write("| cell | old µs | new µs | old ÷ new | best variant | best µs | new ÷ best |\n"
                "|---|---|---|---|---|---|---|\n")
        for name, m, scheme in cells:
            cell = {r["variant"]: r["us"] for r in rows
                    if (r["preset"], r["M"], r["scheme"]) == (name, m, scheme or "bf16")}
            best = min(cell, key=cell.get)
            label = f"{name} M={m}" + (f" {scheme}" if scheme else "")
            f.write(f"| {label} | {cell['old']:.1f} | {cell['new']:.1f} | "
                    f"{cell['old'] / cell['new']:.3f} | {best} | {cell[best]:.1f} | "
                    f"{cell['new'] / cell[best]:.3f} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
