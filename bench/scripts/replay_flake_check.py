"""Diagnosis: is the fp8 direct path's graph-replay test failure a bug or its tolerance?

`tests/test_experts_fp8.py::test_cuda_graph_replay_with_new_inputs_gpu[fp8_tensor-3-
direct-split]` failed once on an H100 in session 72 (relative L2 1.35e-2 against the
quantised reference, tolerance 1e-2, one token's row off by 2% of the peak) on code whose
direct path had passed it twice that day; session 71 lost one failure of the same files
to a cut log. The test draws its new hidden states from the global generator, so what it
computes depends on the tests an xdist worker ran before it.

This runs the test's body (M = 3, E = 16, k = 4, H = 512, I = 256, per-tensor fp8, the
direct path with and without GEMM2's split) under `--seeds` global seeds, and counts the
replays — and the same inputs called eagerly — over the tolerance. A failure under every
amax variant (`--amax`: this tree's rule, or `one-row`, the one-row loop of before session
71) points at the direct path or the tolerance, not the few-row amax; graph and eager alike
at a seed points at numerics, a replay alone at state that replay keeps. Each replay is
also held to a finer yardstick, the reference with GEMM2's input unquantised: where the
kernels' error there matches the quantised reference's, the two only round that input
apart.

Session 73 (H100, `logs/h100-sxm-20261207-replay-flake-check-s73.txt`): 22 of 800
replays over 1e-2 (max 2.1e-2), graph bitwise equal to eager in all 800, the kernels'
error against the yardstick 0.979–1.029× the reference's: numerics, not a race. The test
now draws seeded inputs, asserts graph == eager bitwise and bounds the reference at 3e-2.

    PYTHONPATH=src python3 bench/scripts/replay_flake_check.py --seeds 30 [--amax one-row]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

import moekit  # noqa: E402
import moekit._replay  # noqa: E402
import moekit.reference.quant as reference_quant  # noqa: E402
from helpers import capture_cuda_graph, random_routing, rel_l2  # noqa: E402
from moekit.experts_fp8 import direct_fp8_config  # noqa: E402
from moekit.reference import fused_experts_quantized  # noqa: E402
from test_experts_fp8 import make_case  # noqa: E402

TOL = 1e-2  # the test's GPU_TOL
M, E, K, H, I = 3, 16, 4, 512, 256


def unquantised_gemm2_input(*args, **kwargs) -> torch.Tensor:
    """The quantised reference with GEMM2's input left in float32 (its second fake
    quantisation skipped): a yardstick the kernels and the reference can each be held to,
    where the two disagree on that input's roundings."""
    fake_quantize, calls = reference_quant._fake_quantize, []

    def first_only(x, spec):
        calls.append(spec)
        return fake_quantize(x, spec) if len(calls) == 1 else x
    reference_quant._fake_quantize = first_only
    try:
        return fused_experts_quantized(*args, **kwargs)
    finally:
        reference_quant._fake_quantize = fake_quantize


def check(path: str, seed: int) -> list[tuple]:
    """The test's body under global seed `seed`: (path, seed, replay, graph error, eager
    error, graph output == eager output, graph error and reference error against
    `unquantised_gemm2_input`) for each replay."""
    torch.manual_seed(seed)
    scheme, hidden, q13, q2, ids, weights, b13, b2 = make_case(
        "fp8_tensor", M, E, K, H, I, dtype=torch.bfloat16, device="cuda")
    config = direct_fp8_config(M, K, H, I, scheme)
    if path == "direct-split":
        config = dataclasses.replace(config, gemm2=dataclasses.replace(config.gemm2, group_m=1))

    def call():
        return moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme, b13=b13,
                                        b2=b2, config=config)
    graph, out = capture_cuda_graph(call)
    rows = []
    for replay in (1, 2):
        new_ids, new_weights = random_routing(M, E, K, device="cuda", seed=replay,
                                              skew=4.0 * replay)
        hidden.copy_(torch.randn_like(hidden) * replay)
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        out.fill_(float("nan"))
        graph.replay()
        args = (hidden, q13, q2, ids, weights)
        expected = fused_experts_quantized(*args, scheme=scheme, b13=b13,
                                           b2=b2).double().cpu()
        finer = unquantised_gemm2_input(*args, scheme=scheme, b13=b13, b2=b2).double().cpu()
        eager = call()
        graph_err = rel_l2(out.double().cpu(), expected)
        eager_err = rel_l2(eager.double().cpu(), expected)
        rows.append((path, seed, replay, round(graph_err, 4), round(eager_err, 4),
                     torch.equal(out, eager), round(rel_l2(out.double().cpu(), finer), 4),
                     round(rel_l2(expected, finer), 4)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--amax", choices=("rule", "one-row"), default="rule")
    args = parser.parse_args()
    if args.amax == "one-row":
        import moekit._fp8_quantize as quantize

        quantize._AMAX_ONE_ROW_MAX, quantize._WHOLE_AMAX_MAX = 1 << 30, 0
    moekit._replay.enabled = False  # every eager call runs its kernels
    rows = [row for path in ("direct", "direct-split") for seed in range(args.seeds)
            for row in check(path, seed)]
    bad = [row for row in rows if max(row[3], row[4]) > TOL]
    errors = torch.tensor([row[3] for row in rows])
    print(f"amax {args.amax}: {len(bad)} of {len(rows)} replays over {TOL}; graph error "
          f"median {errors.median():.1e}, p99 {errors.quantile(0.99):.1e}, "
          f"max {errors.max():.1e}; graph == eager in {sum(row[5] for row in rows)}",
          flush=True)
    ratio = torch.tensor([row[6] / row[7] for row in rows])
    print(f"against the reference with GEMM2's input unquantised, the kernels' error ÷ the "
          f"quantised reference's: median {ratio.median():.3f}, min {ratio.min():.3f}, "
          f"max {ratio.max():.3f}", flush=True)
    for path, seed, replay, graph_err, eager_err, same, kernel_far, reference_far in bad:
        print(f"  path {path} seed {seed} replay {replay}: graph {graph_err:.4f}, "
              f"eager {eager_err:.4f}, graph == eager {same}; against GEMM2's input "
              f"unquantised: kernels {kernel_far:.4f}, reference {reference_far:.4f}")


if __name__ == "__main__":
    main()
