"""Experiment: where the direct path should stop — plan path against direct path by M.

The heuristics take the direct path (no dispatch plan, combine fused) up to 4 tokens on
≥ 32 experts (`use_direct_path`, `use_direct_fp8_path`), a boundary measured with
do_bench's dirty L2 flush. This times both paths at the heuristics' tiles for each
(preset, dtype, M) with the clean read flush (`moekit.bench.l2_flush`), CUDA-graph replay
of the whole layer, and checks each against its reference (bf16: float32 reference;
fp8: the quantised reference). Prints JSON lines and appends them to
direct-range-experiment.jsonl under --out.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/direct_range_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

import moekit
import moekit._replay
from moekit import reference
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.experts_fp8 import direct_fp8_config, plan_fp8_config
from moekit.quant import QuantScheme
from moekit.reference import fused_experts_quantized
from moekit.tuning.heuristic import direct_tiles, pick_block_m, tiles_for_block_m

moekit._replay.enabled = False  # this script patches what the ops read: no replays


def time_pair(preset, w, dtype, m, rep_ms) -> dict:
    hidden, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
    act = moekit.Activation.parse(preset.activation)
    out = torch.empty_like(hidden)
    if dtype == "bf16":
        configs = {"plan": tiles_for_block_m(pick_block_m(m, preset.num_experts, preset.top_k)),
                   "direct": direct_tiles(m, preset.top_k, preset.hidden)}
        run = lambda c: moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                             activation=act, b13=w.b13, b2=w.b2, config=c,
                                             out=out)
        f32 = lambda t: None if t is None else t.float()
        ref = reference.fused_experts(hidden.float(), w.w13.float(), w.w2.float(), topk.ids,
                                      topk.weights, activation=act, b13=f32(w.b13),
                                      b2=f32(w.b2))
    else:
        scheme = QuantScheme.parse(dtype)
        configs = {"plan": plan_fp8_config(m, preset.num_experts, preset.top_k, scheme),
                   "direct": direct_fp8_config(m, preset.top_k, preset.hidden,
                                               preset.inter, scheme)}
        run = lambda c: moekit.fused_experts_fp8(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                                 scheme=scheme, activation=act, b13=w.b13,
                                                 b2=w.b2, config=c, out=out)
        ref = fused_experts_quantized(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                      scheme=scheme, activation=act, b13=w.b13,
                                      b2=w.b2).float()
    row = {"preset": preset.name, "dtype": dtype, "M": m}
    for name, config in configs.items():
        out.fill_(float("nan"))
        row[f"{name}_us"] = graph_replay_us(lambda c=config: run(c), rep_ms)
        row[f"{name}_rel_err"] = ((out.float() - ref).norm() / ref.norm()).item()
    row["direct_speedup"] = row["plan_us"] / row["direct_us"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--presets", nargs="+", default=["qwen3-30b-a3b", "olmoe-1b-7b",
                                                          "deepseek-v2-lite",
                                                          "granite-3.0-3b-a800m"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp8_tensor", "fp8_block"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--rep-ms", type=float, default=25)
    args = parser.parse_args()
    path = os.path.join(args.out, "direct-range-experiment.jsonl")
    head = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "git": os.environ.get("MOEKIT_GIT_COMMIT")}
    with open(path, "a") as f:
        f.write(json.dumps(head) + "\n")
    for name in args.presets:
        preset = PRESETS[name]
        bf16 = make_weights(preset, torch.bfloat16, torch.device("cuda"))
        for dtype in args.dtypes:
            w = bf16 if dtype == "bf16" else quantize_experts(bf16, dtype)
            for m in args.tokens:
                row = time_pair(preset, w, dtype, m, args.rep_ms)
                print(json.dumps(row), flush=True)
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            del w
        del bf16
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
