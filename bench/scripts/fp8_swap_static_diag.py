"""Diagnosis: which swapped fp8 GEMM moves the error of a small static-scale case, and in
how many inputs (seeds).

tests/test_fp8_swap.py's GPU run of the interpreter-sized cases failed once (H100,
session 44): the plan path, static scales, relu², 10 tokens, swapped, relative L2 1.7e-2
against 1e-2. Each case runs unswapped ("none"), with only the GEMM1s swapped ("g1"),
only the GEMM2s ("g2") and all four, over six seeds, against the quantised reference.

Replays are switched off here (`moekit._replay`): a replay reruns the launches recorded
for the same shapes, so without this only each case's first two variants of its first
seed would be measured. (Session 44's logged run,
`logs/h100-sxm-20261205-diag-static-swap-s44.txt`, had them on: seed 0's "none" and
"g1" columns are what they say, and every later column replays g1's recording.)

    PYTHONPATH=src python3 bench/scripts/fp8_swap_static_diag.py
"""

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import moekit._fp8_swap as swap  # noqa: E402
import moekit._replay  # noqa: E402
from moekit.experts_fp8 import direct_fp8_config  # noqa: E402
from test_experts_fp8 import STATIC, make_case, run_triton  # noqa: E402
from test_fp8_swap import plan  # noqa: E402


def relative_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def direct_split(M, k, H, I, scheme):
    config = direct_fp8_config(M, k, H, I, scheme)
    return dataclasses.replace(config, gemm2=dataclasses.replace(config.gemm2, group_m=1))


CASES = [
    ("plan-static-relu2", STATIC, 10, 4, 2, 128, 128, "relu2", plan(16, 64, 64, 64, 64)),
    ("plan-static-silu", STATIC, 10, 4, 2, 128, 128, "silu", plan(16, 64, 64, 64, 64)),
    ("plan-tensor-relu2", "fp8_tensor", 10, 4, 2, 128, 128, "relu2", plan(16, 128, 64, 64, 64)),
    ("direct-split-static", STATIC, 3, 16, 4, 512, 256, "silu",
     direct_split(3, 4, 512, 256, STATIC)),
    ("plan-static-qwen3ish", STATIC, 24, 16, 8, 2048, 768, "silu", None),
    ("plan-tensor-qwen3ish", "fp8_tensor", 24, 16, 8, 2048, 768, "silu", None),
]
EVERY = (*swap.GEMMS, swap.BLOCK)
VARIANTS = {"none": (), "g1": ("plan1", "direct1", swap.BLOCK),
            "g2": ("plan2", "direct2", swap.BLOCK), "all": EVERY}


def main() -> None:
    moekit._replay.enabled = False
    print("promote every", swap.PROMOTE_K, "products; stages", swap._STAGES)
    for name, scheme, M, E, k, H, I, act, config in CASES:
        for seed in range(6):
            case = make_case(scheme, M, E, k, H, I, act, dtype=torch.bfloat16, device="cuda",
                             seed=seed)
            errors = []
            for variant, gemms in VARIANTS.items():
                swap.SWAPPED = frozenset(gemms)
                out, expected = run_triton(*case, act=act, config=config)
                errors.append(f"{variant} {relative_l2(out, expected):.2e}")
            print(f"{name} seed {seed}: " + "  ".join(errors), flush=True)


if __name__ == "__main__":
    main()
