"""Experiment: the Gluon GEMMs with each K step's A rows taken into registers once for both
MMAs of the step (`A_IN_REGISTERS` of `moekit._gluon_gemm1` and `moekit._gluon_gemm2`)
instead of each MMA reading them from shared memory.

Session 15's model (bench/NOTES.md): at the fp8 peak the two math warpgroups' MMAs read
96 B/clk of shared memory and the TMA writes 47 B/clk into the ring, against the 128 B/clk
an SM's shared memory delivers; A once per step for gate and up (GEMM1) or for both
halves (the wide GEMM2) makes it 127. Compiled on the CPU: 0–12 bytes of spill by case.
For fp8 prefill cells: each Gluon kernel's CUDA time (`profiled_kernel_us`: torch.profiler,
ten eager calls after three, no flush) and the layer's graph replay (L2 read-flushed), off
and on, two interleaved rounds; the output must be bitwise the same (the same MMAs on the
same values).

    PYTHONPATH=src python3 bench/scripts/gluon_register_a_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from gluon_grouped_gemm_experiment import profiled_kernel_us

import moekit
import moekit._gluon_gemm1 as gemm1
import moekit._gluon_gemm2 as gemm2
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us

CELLS = [("qwen3-30b-a3b", 4096, "fp8_tensor"), ("qwen3-30b-a3b", 4096, "fp8_block"),
         ("mixtral-8x7b", 4096, "fp8_tensor"), ("qwen3-30b-a3b", 16384, "fp8_tensor"),
         ("deepseek-v3", 4096, "fp8_block"), ("qwen3-30b-a3b", 4096, "fp8_channel")]
KERNELS = ("_gemm1_ws_kernel", "_gemm2_ws_kernel")


def set_registers(on: bool) -> None:
    gemm1.A_IN_REGISTERS = on
    gemm2.A_IN_REGISTERS = on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    with open(os.path.join(args.out, "gluon-register-a-experiment.jsonl"), "w") as log:
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
            set_registers(False)
            expected = call()
            for round_ in range(args.rounds):
                for on in (False, True):
                    set_registers(on)
                    out = call()
                    row = dict(preset=name, M=m, scheme=scheme, round=round_, a_in_registers=on,
                               bitwise_equal=bool(torch.equal(out, expected)),
                               **{k: round(profiled_kernel_us(call, k), 1) for k in KERNELS},
                               layer_us=round(graph_replay_us(call), 1))
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    print(json.dumps(row), flush=True)
            del w, expected
            torch.cuda.empty_cache()
    set_registers(False)


if __name__ == "__main__":
    main()
