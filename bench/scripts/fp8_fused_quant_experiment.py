"""Experiment: fp8 GEMM1 quantising hidden itself (`fuse_input_quant=True`) against the
separate quantiser launch, to settle `FUSED_INPUT_QUANT_MAX_TOKENS`.

For each preset, scheme and M it times CUDA-graph replays of `fused_experts_fp8` both
ways and checks that the outputs are bitwise equal (the same formulas either way).

Usage (on the device): PYTHONPATH=src python3 bench/scripts/fp8_fused_quant_experiment.py --out $OUT
Writes fp8-fused-quant-experiment.json under --out and prints one line per cell.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

import moekit
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.quant import QuantScheme
from moekit.quant.scheme import PRESET_NAMES

SCHEMES = PRESET_NAMES
TOKENS = (1, 8, 64, 256, 1024)


def time_cell(name, preset, weights, scheme, m) -> dict:
    """One cell: µs fused and separate, and whether the outputs are bitwise equal."""
    hidden, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
    parsed = QuantScheme.parse(scheme)

    def run(fuse):
        return moekit.fused_experts_fp8(hidden, weights.w13, weights.w2, topk.ids, topk.weights,
                                        scheme=parsed, activation=preset.activation,
                                        b13=weights.b13, b2=weights.b2, fuse_input_quant=fuse)
    fused_us = graph_replay_us(lambda: run(True))
    separate_us = graph_replay_us(lambda: run(False))
    row = {"preset": name, "scheme": scheme, "M": m, "fused_us": round(fused_us, 2),
           "separate_us": round(separate_us, 2), "speedup": round(separate_us / fused_us, 3),
           "bitwise_equal": bool(torch.equal(run(True), run(False)))}
    print(f"{name} {scheme} M={m}: separate {row['separate_us']} µs, fused {row['fused_us']} µs "
          f"({row['speedup']}×), bitwise equal: {row['bitwise_equal']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b"])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    rows = []
    for name in args.presets:
        preset = PRESETS[name]
        bf16 = make_weights(preset, torch.bfloat16, torch.device("cuda"))
        for scheme in args.schemes:
            weights = quantize_experts(bf16, scheme)
            rows += [time_cell(name, preset, weights, scheme, m) for m in args.tokens]
            del weights
        del bf16
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__,
              "command": "bench/scripts/fp8_fused_quant_experiment.py", "rows": rows}
    path = os.path.join(args.out, "fp8-fused-quant-experiment.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
