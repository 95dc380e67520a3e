"""Experiment: the Gluon GEMMs' tile order (`GROUP_M` row tiles side by side over each
column tile, against row tile major) and promotion interval (`PROMOTE_STEPS`: two 128-deep
K steps chained per promotion into fp32, where the scales are constant along K).

Nsight Compute (bench/scripts/ncu_gemms.py, session 15) showed mixtral's fp8 GEMM1 at
74% of DRAM throughput — w13 streamed once per row tile (112 column tiles per row tile,
row tile major) — and qwen3's at no unit's limit (tensor pipe ~60%, L2 70%, DRAM 49%),
each K step waiting for its MMA before adding it. For fp8 prefill cells: each Gluon
kernel's CUDA time (torch.profiler, ten eager calls, no flush) and the layer's graph
replay (L2 read-flushed), per variant, two interleaved rounds; the error against the
quantised reference on 256 tokens; whether the output is bitwise the default's (tile
order must not change any value; chaining two steps may change the last bits).

    PYTHONPATH=src python3 bench/scripts/gluon_order_promote_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch.profiler import ProfilerActivity, profile

import moekit
import moekit._gluon_gemm1 as gemm1
import moekit._gluon_gemm2 as gemm2
from moekit.bench.fp8 import quantised_reference, quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us

CELLS = [("mixtral-8x7b", 4096, "fp8_tensor"), ("qwen3-30b-a3b", 4096, "fp8_tensor"),
         ("qwen3-30b-a3b", 4096, "fp8_block"), ("mixtral-8x7b", 16384, "fp8_tensor"),
         ("deepseek-v3", 4096, "fp8_block"), ("qwen3-30b-a3b", 16384, "fp8_tensor"),
         ("qwen3-30b-a3b", 4096, "fp8_channel")]
VARIANTS = {"row major, promote 1": (1, 1), "group 8, promote 1": (8, 1),
            "row major, promote 2": (1, 2), "group 8, promote 2": (8, 2)}
KERNELS = ("_gemm1_ws_kernel", "_gemm2_ws_kernel")
CALLS = 10


def kernel_us(run) -> dict[str, float]:
    """Mean CUDA µs per call of each Gluon kernel over CALLS eager calls of `run`."""
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            run()
        torch.cuda.synchronize()
    out = {}
    for event in prof.key_averages():
        if event.key in KERNELS:
            total = getattr(event, "device_time_total", None) or event.cuda_time_total
            out[event.key] = round(total / CALLS, 1)
    return out


def set_variant(group_m: int, promote: int) -> None:
    for module in (gemm1, gemm2):
        module.GROUP_M = group_m
        module.PROMOTE_STEPS = promote


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    with open(os.path.join(args.out, "gluon-order-promote-experiment.jsonl"), "w") as log:
        for name, m, scheme in CELLS:
            preset = PRESETS[name]
            bf16 = make_weights(preset, torch.bfloat16, device)
            w = quantize_experts(bf16, scheme)
            del bf16
            hidden, topk = make_tokens(preset, m, torch.bfloat16, device)
            rows = torch.randperm(m, generator=torch.Generator().manual_seed(0))[:256]
            reference = quantised_reference(hidden, w, topk, scheme, preset.activation, rows)

            def call(w=w, hidden=hidden, topk=topk, scheme=scheme, preset=preset):
                return moekit.fused_experts_fp8(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                                scheme=scheme, activation=preset.activation,
                                                b13=w.b13, b2=w.b2)
            set_variant(1, 1)
            default = call()
            for round_ in range(args.rounds):
                for label, (group_m, promote) in VARIANTS.items():
                    set_variant(group_m, promote)
                    out = call()
                    row = dict(preset=name, M=m, scheme=scheme, round=round_, variant=label,
                               bitwise_equal=bool(torch.equal(out, default)),
                               rel_to_default=rel_l2(out, default),
                               rel_err=rel_l2(out[rows.to(device)], reference),
                               **kernel_us(call), layer_us=round(graph_replay_us(call), 1))
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    print(json.dumps(row), flush=True)
            del w, default, reference
            torch.cuda.empty_cache()
    set_variant(1, 1)


if __name__ == "__main__":
    main()
