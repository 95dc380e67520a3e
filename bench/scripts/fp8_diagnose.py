"""Where fp8 kernel output departs from the quantised reference (a GPU diagnostic).

For a few (preset, scheme, M) cases: GEMM1's quantised input against the reference's
(bitwise), GEMM2's quantised input against the reference's (which elements differ and how
far the reference's pre-rounding value was from a rounding boundary), and the output's
relative L2 error — run twice, the second time with the launch option
`max_num_imprecise_acc_default=0`, meant to force fp32 promotion after every MMA. It
does not change the kernels (session 6 measured identical errors with and without it,
bench/NOTES.md "fp8 prefill"), so the two runs compare the same kernel; the kernels now
promote every K tile explicitly.
"""

from __future__ import annotations

import json
import os
import sys

import torch

import moekit
from moekit import experts_fp8
from moekit.bench.presets import PRESETS
from moekit.quant import QuantScheme, quantize_weight
from moekit.quant.fp8 import dequantize, quantize
from moekit.reference import apply_activation, fused_experts_quantized
from moekit.reference.quant import _grouped_matmul

sys.path.insert(0, "tests")
import moekit._replay
from helpers import random_experts, random_routing  # noqa: E402

moekit._replay.enabled = False  # this script patches what the ops read: no replays

DEVICE = os.environ.get("DEVICE", "cuda")


class Recorder:
    """Wraps a Triton kernel: records the launch arguments, optionally adds options."""

    def __init__(self, kernel, options):
        self.kernel, self.options, self.args = kernel, options, None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.args = args
            return self.kernel[grid](*args, **kwargs, **self.options)
        return launch


def case(preset, scheme_name, M, options):
    p = PRESETS[preset]
    E = min(p.num_experts, 64)
    k = p.top_k
    w13, w2, b13, b2 = random_experts(E, p.hidden, p.inter, bias=p.bias, dtype=torch.bfloat16,
                                      device=DEVICE)
    scheme = QuantScheme.parse(scheme_name)
    q13, q2 = quantize_weight(w13, scheme.weight), quantize_weight(w2, scheme.weight)
    hidden = torch.randn(M, p.hidden, device=DEVICE, dtype=torch.bfloat16)
    ids, weights = random_routing(M, E, k, device=DEVICE, seed=M)
    g1 = Recorder(experts_fp8._gemm1_fp8_kernel, options)
    g2 = Recorder(experts_fp8._gemm2_fp8_kernel, options)
    real1, real2 = experts_fp8._gemm1_fp8_kernel, experts_fp8._gemm2_fp8_kernel
    experts_fp8._gemm1_fp8_kernel, experts_fp8._gemm2_fp8_kernel = g1, g2
    try:
        out = moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme,
                                       activation=p.activation, b13=b13, b2=b2, backend="triton")
    finally:
        experts_fp8._gemm1_fp8_kernel, experts_fp8._gemm2_fp8_kernel = real1, real2
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    ref = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme,
                                  activation=p.activation, b13=b13, b2=b2, )
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    result = {"preset": preset, "scheme": scheme_name, "M": M, "options": options,
              "out_rel_l2": rel(out, ref)}

    # GEMM1 input: the kernel's fp8 hidden against the reference's quantisation.
    xq, xs = g1.args[0], g1.args[1]
    rq, rs = quantize(hidden.float(), scheme.activation)
    mismatch = xq.view(torch.uint8) != rq.view(torch.uint8)
    result["hidden_fp8_mismatch"] = mismatch.float().mean().item()
    result["hidden_scale_rel"] = rel(xs.reshape(-1)[: rs.numel()], rs.reshape(-1))

    # GEMM2 input per slot: kernel's fp8 inter against the reference's, from the same pairs.
    inter_q, inter_scale, sorted_pairs = g1.args[5], g1.args[6], g1.args[7]
    num_pairs = M * k
    slots = torch.nonzero(sorted_pairs < num_pairs).squeeze(1)
    pairs = sorted_pairs[slots].long()
    tokens, experts = pairs // k, ids.reshape(-1)[pairs].long()
    x = dequantize(rq, rs, scheme.activation)
    h = _grouped_matmul(x[tokens], experts, q13)
    if b13 is not None:
        h = h + b13.float()[experts]
    act = apply_activation(h, moekit.Activation.parse(p.activation))
    spec2 = scheme.gemm2_input
    aq, ascale = quantize(act, spec2)
    kq = inter_q[slots]
    diff = kq.view(torch.uint8) != aq.view(torch.uint8)
    result["inter_fp8_mismatch"] = diff.float().mean().item()
    ks = inter_scale[slots][:, : ascale.shape[1]] if inter_scale.dim() == 2 else inter_scale
    result["inter_scale_rel"] = rel(ks, ascale) if inter_scale.dim() == 2 else None
    kdq = dequantize(kq, ks if inter_scale.dim() == 2 else ascale, spec2)
    adq = dequantize(aq, ascale, spec2)
    result["inter_dequant_rel_l2"] = rel(kdq, adq)
    # How far from a rounding boundary were the mismatched elements (in fp8 ulps)?
    if diff.any():
        ulp_dist = (kdq[diff] - adq[diff]).abs() / (adq[diff].abs().clamp(min=1e-30))
        result["inter_mismatch_rel_change_median"] = ulp_dist.median().item()
        result["inter_mismatch_count"] = int(diff.sum())
    # GEMM2 and the combine alone: the reference's GEMM2 fed the kernel's own inter.
    y = _grouped_matmul(kdq, experts, q2)
    if b2 is not None:
        y = y + b2.float()[experts]
    y = y * weights.reshape(-1)[pairs].float().unsqueeze(1)
    own = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    own.index_add_(0, tokens, y)
    result["out_rel_l2_vs_ref_on_kernel_inter"] = rel(out, own.to(out.dtype))
    result["out_rel_l2_vs_ref_on_kernel_inter_fp32"] = rel(out, own)
    return result


def main():
    out_dir = os.environ.get("OUT", ".")
    cases = [("qwen3-30b-a3b", "fp8_block", 1), ("qwen3-30b-a3b", "fp8_tensor", 1),
             ("qwen3-30b-a3b", "fp8_channel", 64), ("mixtral-8x7b", "fp8_block", 1),
             ("olmoe-1b-7b", "fp8_block", 512)]
    results = []
    for preset, scheme, M in cases:
        for options in ({}, {"max_num_imprecise_acc_default": 0}):
            try:
                r = case(preset, scheme, M, options)
            except Exception as exc:  # noqa: BLE001 — a diagnostic reports and goes on
                r = {"preset": preset, "scheme": scheme, "M": M, "options": options,
                     "error": repr(exc)[:500]}
            print(json.dumps(r), flush=True)
            results.append(r)
    with open(os.path.join(out_dir, "fp8-diagnose.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
