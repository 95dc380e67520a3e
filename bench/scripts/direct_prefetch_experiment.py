"""Would GEMM2's weights prefetched into L2 by GEMM1 shorten the fp8 direct path?

The direct path's two GEMMs each start with a ramp (ids, then the first weight tiles)
and end with a drain, and GEMM2 cannot start before GEMM1 ends; at gpt-oss M = 1 the
layer runs at ~58% of its roofline. With `experts_direct_fp8.PREFETCH_W2` each GEMM1
program, after its K loop, asks L2 for its share of its expert's w2 (one bulk prefetch),
so part of w2 streams during GEMM1's drain, the launch gap and GEMM2's ramp. This times
the layer (graph replay, L2 flushed) with the flag off and on, in rotated rounds, and
checks the outputs are bitwise equal (a prefetch changes no value).

    PYTHONPATH=src python3 bench/scripts/direct_prefetch_experiment.py --out $OUT \\
        [--cells gpt-oss-120b:1 ...] [--schemes fp8_tensor fp8_block]
"""

from __future__ import annotations

import argparse
import sys

import torch

import moekit
import moekit.experts_direct_fp8
from moekit.bench.experiment_files import experiment_meta, rows_table, write_experiment
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.experts_fp8 import _select_fp8_config
from moekit.quant import QuantScheme

STEM = "fp8-direct-prefetch-experiment"
CELLS = ["gpt-oss-120b:1", "gpt-oss-120b:2", "qwen3-30b-a3b:1", "qwen3-30b-a3b:4",
         "granite-3.0-3b-a800m:1", "granite-3.0-3b-a800m:4", "deepseek-v2-lite:1",
         "deepseek-v2-lite:4", "olmoe-1b-7b:1", "deepseek-v3:1"]


def run_cell(name: str, m: int, scheme: str, rounds: int, log) -> dict:
    """The layer with the prefetch off and on: µs, best of `rounds`."""
    preset = PRESETS[name]
    dev = torch.device("cuda")
    w = quantize_experts(make_weights(preset, torch.bfloat16, dev), scheme)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, dev)
    q = QuantScheme.parse(scheme)
    config = _select_fp8_config(hidden, preset.num_experts, preset.top_k, preset.inter, q)
    row = {"preset": name, "M": m, "scheme": scheme, "config": str(config.as_ints())}
    if not config.direct:
        log(f"{name} M={m} {scheme}: the plan path")
        return row

    def call():
        return moekit.fused_experts_fp8(hidden, w.w13, w.w2, topk.ids, topk.weights, scheme=q,
                                        b13=w.b13, b2=w.b2, activation=preset.activation,
                                        config=config)

    outs, samples = {}, {False: [], True: []}
    for on in (False, True):
        moekit.experts_direct_fp8.PREFETCH_W2 = on
        outs[on] = call().clone()
    for r in range(rounds):
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            moekit.experts_direct_fp8.PREFETCH_W2 = on
            samples[on].append(graph_replay_us(call, rep_ms=30))
    moekit.experts_direct_fp8.PREFETCH_W2 = False
    row.update(off_us=round(min(samples[False]), 2), on_us=round(min(samples[True]), 2),
               speedup=round(min(samples[False]) / min(samples[True]), 3),
               bitwise_equal=bool(torch.equal(outs[False], outs[True])))
    log(" ".join(f"{k}={v}" for k, v in row.items()))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--cells", nargs="+", default=CELLS, metavar="PRESET:M")
    parser.add_argument("--schemes", nargs="+", default=["fp8_tensor", "fp8_block"])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    meta = experiment_meta(rounds=args.rounds)
    notes = ["- the fp8 layer at the shipped config, `experts_direct_fp8.PREFETCH_W2` off and "
             "on (GEMM1's programs bulk-prefetch their shares of w2 into L2 after their K loops); "
             f"graph replay, L2 read-flushed, best of {args.rounds} rounds in alternating "
             "order; speedup = off ÷ on"]
    rows = []
    for text in args.cells:
        name, m = text.rsplit(":", 1)
        for scheme in args.schemes:
            rows.append(run_cell(name, int(m), scheme, args.rounds, print))
            keys = list(dict.fromkeys(k for row in rows for k in row))
            write_experiment(args.out, STEM, meta, rows,
                             "fp8 direct path: w2 prefetched into L2 by GEMM1", notes,
                             rows_table([{k: row.get(k, "—") for k in keys} for row in rows],
                                        keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
