"""Experiment: the Gluon GEMM1 gathering its A rows by cp.async from hidden quantised once
per token (`moekit._gluon_gemm1.gather_rows`), against TMA over rows the quantiser wrote to
every pair's plan slot (k copies of hidden: 67 MB of fp8 at qwen3 M = 4096).

Prediction: the quantiser's time falls to that of one [M, H] pass (qwen3 M = 4096: ~21 →
~6 µs) and GEMM1 stays within noise if its producer keeps the ring full (its A rows now
come from L2 by 16-byte copies of 128 threads instead of one TMA box). For each fp8 prefill
cell: GEMM1's and the quantiser's CUDA time (`profiled_kernel_us`: torch.profiler, ten
eager calls after three, no flush) and the layer's graph replay (L2 read-flushed), off
and on, two interleaved rounds; the output must be bitwise the same. (Session 17 ran a
third mode, the producer fencing each stage one step late instead of the math warpgroups
every step: no consistent difference, removed; `h200-20261202-gluon-gather-experiment-s17.md`.)

    PYTHONPATH=src python3 bench/scripts/gluon_gather_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from gluon_grouped_gemm_experiment import profiled_kernel_us

import moekit
import moekit._gluon_gemm1 as gemm1
from moekit._gluon_gemm1 import GATHER_MIN_TOP_K
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us

CELLS = [("qwen3-30b-a3b", 1024, "fp8_tensor"), ("qwen3-30b-a3b", 4096, "fp8_tensor"),
         ("qwen3-30b-a3b", 4096, "fp8_channel"), ("qwen3-30b-a3b", 16384, "fp8_tensor"),
         ("mixtral-8x7b", 4096, "fp8_tensor"), ("deepseek-v3", 4096, "fp8_channel"),
         ("olmoe-1b-7b", 4096, "fp8_tensor")]
KERNELS = ("_gemm1_ws_kernel", "_quantize_rows_kernel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    with open(os.path.join(args.out, "gluon-gather-experiment.jsonl"), "w") as log:
        for name, m, scheme in CELLS:
            preset = PRESETS[name]
            bf16 = make_weights(preset, torch.bfloat16, device)
            w = quantize_experts(bf16, scheme)
            del bf16
            hidden, topk = make_tokens(preset, m, torch.bfloat16, device)

            def call(w=w, hidden=hidden, topk=topk, scheme=scheme, preset=preset):
                return moekit.fused_experts_fp8(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                                scheme=scheme, activation=preset.activation,
                                                b13=w.b13, b2=w.b2)
            gemm1.GATHER_MIN_TOP_K = 10**9
            expected = call()
            for round_ in range(args.rounds):
                for on in (False, True):
                    gemm1.GATHER_MIN_TOP_K = 1 if on else 10**9
                    out = call()
                    row = dict(preset=name, M=m, scheme=scheme, round=round_, gather_a=on,
                               bitwise_equal=bool(torch.equal(out, expected)),
                               **{k: round(profiled_kernel_us(call, k), 1) for k in KERNELS},
                               layer_us=round(graph_replay_us(call), 1))
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    print(json.dumps(row), flush=True)
            del w, expected
            torch.cuda.empty_cache()
    gemm1.GATHER_MIN_TOP_K = GATHER_MIN_TOP_K


if __name__ == "__main__":
    main()
