"""Experiment: TMA weight tiles (and the TMA, persistent GEMM2) at decode row tiles.

`moekit._tma.use_tma` takes TMA only at the 128-row prefill tile, where it was measured
(bench/NOTES.md, v2). At decode (16–64-row tiles) GEMM1 streams the weights at ~2.1 TB/s
(stage breakdown); this times the heuristic's decode configurations with `use_tma`
forced on against the pointer path (CUDA-graph replay) and checks the TMA output
against the float32 reference. Each cell is printed and appended to
decode-tma-experiment.jsonl under --out as soon as it is measured.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/decode_tma_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import moekit
import moekit._replay
from moekit import reference
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us

moekit._replay.enabled = False  # this script patches what the ops read: no replays

CELLS = [("qwen3-30b-a3b", (1, 8, 64)), ("granite-3.0-3b-a800m", (1, 64)),
         ("mixtral-8x7b", (1, 64))]


def time_cell(name, preset, w, m, rep_ms) -> dict:
    """One cell: pointer and forced-TMA graph-replay µs, and the TMA output's error."""
    hidden, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))

    def call():
        return moekit.fused_experts(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                    activation=preset.activation, b13=w.b13, b2=w.b2)
    pointer_path = moekit.experts.use_tma
    try:
        pointer_us = graph_replay_us(call, rep_ms)
        moekit.experts.use_tma = lambda *a: True
        tma_us = graph_replay_us(call, rep_ms)
        out = call()
    finally:
        moekit.experts.use_tma = pointer_path
    f32 = lambda t: None if t is None else t.float()
    ref = reference.fused_experts(hidden.float(), w.w13, w.w2, topk.ids, topk.weights,
                                  activation=preset.activation, b13=f32(w.b13), b2=f32(w.b2))
    return {"device": torch.cuda.get_device_name(), "preset": name, "M": m,
            "git_commit": os.environ.get("MOEKIT_GIT_COMMIT"),
            "pointer_us": round(pointer_us, 2), "tma_us": round(tma_us, 2),
            "speedup": round(pointer_us / tma_us, 3),
            "tma_rel_err": ((out.float() - ref).norm() / ref.norm()).item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rep-ms", type=float, default=20)
    args = parser.parse_args()
    path = os.path.join(args.out, "decode-tma-experiment.jsonl")
    for name, tokens in CELLS:
        preset = PRESETS[name]
        weights = make_weights(preset, torch.bfloat16, torch.device("cuda"))
        for m in tokens:
            row = time_cell(name, preset, weights, m, args.rep_ms)
            print(json.dumps(row), flush=True)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
