"""Experiment: block-scaled fp8 with biases through the Gluon GEMM1, against Triton's.

gpt-oss with 128×128 weight blocks ran its prefill at 28–39% of the fp8 peak on an H100
(session 52's table) because the Gluon GEMM1 declined it twice: I = 2880 is 22.5 blocks,
so every up column tile straddles two blocks, and biases with scales along K spilled
~300 bytes in the epilogue. Now the up tile takes two weight scales per K step (one per
register, `split_up_scales`) and the biases start the sums (no epilogue add). Compiled
for sm_90 on the CPU: the gpt-oss form (straddling, bf16 biases, swigluoai) spills 52
bytes (2 stores, 4 loads per K step in one math warpgroup); whole blocks with biases
(I a multiple of 128, no preset has it) spill 260 (20 stores, 22 loads per K step).

For each cell this times, in CUDA-graph replay (L2 emptied by a read before each replay,
rounds interleaved, median), the whole fp8 layer at its heuristic configuration with the
Gluon GEMM1 and with Triton's (`MOEKIT_GLUON_GEMM1=0`; GEMM2 the same in both), checks
each output against the quantised float32 reference on 256 sampled rows, and reports the
fp8 peak measured in the same run (torch._scaled_mm 8192³). Cells: gpt-oss-120b, the
same layer with I = 2816 (whole blocks) for the second form, and without biases
(straddling up tiles alone: 168 bytes of spill, 11 stores a K step). Prediction: the
Gluon GEMM1 1.3–1.6× faster at M ≥ 4096 on gpt-oss (the layer from 28–39% toward the
per-tensor scheme's 43–54%); on whole blocks with its spills, less or none. (Session 58's
first run, at 16d9543, took whole blocks with biases into the Gluon GEMM1: 1.22× at
M = 4096, 0.93× at 16384, since declined by `takes_biases`; from then on both of that
cell's rows run Triton's GEMM1.)

Usage (on the device): PYTHONPATH=src python3 bench/scripts/fp8_block_bias_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

import torch

import moekit
from moekit._gluon import GEMM1_ENV
from moekit.bench.ceilings import _fp8_TFLOPs
from moekit.bench.experiment_files import experiment_meta, rows_table, write_experiment
from moekit.bench.fp8 import quantised_reference, quantize_experts
from moekit.bench.inputs import make_tokens, make_weights, reference_rows, rel_err
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.experts_fp8 import default_fp8_config, gluon_gemms
from moekit.quant import QuantScheme

SCHEME = "fp8_block"
GPT_OSS = PRESETS["gpt-oss-120b"]
# (label, preset, token counts)
CELLS = [
    ("gpt-oss-120b", GPT_OSS, (1024, 4096, 8192, 16384)),
    ("gpt-oss I=2816", dataclasses.replace(GPT_OSS, name="gpt-oss-120b-i2816", inter=2816),
     (4096, 16384)),
    # straddling up tiles without biases (two up scales a step; 168 bytes of spill)
    ("gpt-oss no biases", dataclasses.replace(GPT_OSS, name="gpt-oss-120b-nobias", bias=False),
     (4096, 16384)),
]


def _layer(preset, weights, hidden, topk, config):
    scheme = QuantScheme.parse(SCHEME)
    return lambda: moekit.fused_experts_fp8(
        hidden, weights.w13, weights.w2, topk.ids, topk.weights, scheme=scheme,
        activation=preset.activation, b13=weights.b13, b2=weights.b2, config=config)


def _with_gemm1(setting: str | None, fn):
    """`fn()` with `GEMM1_ENV` set to `setting` (None: unset, the library's choice)."""
    saved = os.environ.pop(GEMM1_ENV, None)
    if setting is not None:
        os.environ[GEMM1_ENV] = setting
    try:
        return fn()
    finally:
        os.environ.pop(GEMM1_ENV, None)
        if saved is not None:
            os.environ[GEMM1_ENV] = saved


def time_cell(label: str, preset, weights, m: int, rounds: int, peak: float) -> list[dict]:
    """Rows of one cell: the layer with the Gluon GEMM1 and with Triton's."""
    device = torch.device("cuda")
    hidden, topk = make_tokens(preset, m, torch.bfloat16, device)
    sample = reference_rows(m, 256)
    ref = quantised_reference(hidden, weights, topk, SCHEME, preset.activation, sample)
    config = default_fp8_config(m, preset.num_experts, preset.top_k, preset.hidden,
                                preset.inter, QuantScheme.parse(SCHEME))
    layer = _layer(preset, weights, hidden, topk, config)

    def chosen():
        return gluon_gemms(hidden, weights.w13, weights.w2, SCHEME, preset.activation,
                           config.block_m, weights.b13)[0]

    variants = {"gluon": None, "triton": "0"}
    ran = {name: _with_gemm1(setting, chosen) for name, setting in variants.items()}
    errs = {name: rel_err(_with_gemm1(setting, layer), ref, sample)
            for name, setting in variants.items()}
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, setting in variants.items():
            times[name].append(_with_gemm1(setting, lambda: graph_replay_us(layer, rep_ms=40)))
    flops = 2 * m * preset.top_k * 3 * preset.hidden * preset.inter
    triton_us = statistics.median(times["triton"])
    rows = []
    for name in variants:
        us = statistics.median(times[name])
        rows.append({
            "cell": label, "M": m, "block_m": config.block_m, "gemm1": name,
            "gluon_gemm1_ran": ran[name], "us": round(us, 1),
            "pct_fp8_peak": round(100 * flops / us / 1e6 / peak, 1),
            "speedup_vs_triton": round(triton_us / us, 3), "rel_err": f"{errs[name]:.2e}",
            "rounds": [round(t, 1) for t in times[name]], "fp8_peak_TFLOPs": round(peak, 1),
        })
        print(rows[-1], flush=True)
    return rows


def run(rounds: int, labels: list[str] | None) -> list[dict]:
    peak = _fp8_TFLOPs(8192)
    rows = []
    for label, preset, tokens in CELLS:
        if labels and label not in labels:
            continue
        weights = quantize_experts(make_weights(preset, torch.bfloat16, torch.device("cuda")),
                                   SCHEME)
        for m in tokens:
            rows += time_cell(label, preset, weights, m, rounds, peak)
        del weights
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cells", nargs="+", default=None,
                        help=f"labels of CELLS (default all: {[c[0] for c in CELLS]})")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rows = run(args.rounds, args.cells)
    notes = ["- fp8_block (128×128 weight blocks, 1×128 input groups), swigluoai, biases "
             "(but in the cell named without them); "
             "the heuristic's configuration; CUDA-graph replay of the whole layer, L2 emptied "
             "by a read before each replay, rounds interleaved, median",
             "- gemm1: the Gluon GEMM1 (the library's choice) or Triton's "
             "(MOEKIT_GLUON_GEMM1=0), GEMM2 the same; gluon_gemm1_ran: what the predicate "
             "chose; rel_err: against the quantised float32 reference on 256 sampled rows",
             "- pct_fp8_peak: layer FLOPs over the torch._scaled_mm 8192³ peak of this run"]
    write_experiment(args.out, "fp8-block-bias-experiment", experiment_meta(rounds=args.rounds),
                     rows, "Block-scaled fp8 with biases: the Gluon GEMM1 against Triton's",
                     notes, rows_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
