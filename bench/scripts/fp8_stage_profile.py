"""Where an fp8 prefill call spends its GPU time, kernel by kernel (torch.profiler).

For qwen3-30b-a3b (per-tensor, per-channel and block scales) and mixtral-8x7b (per-tensor) at
M = 4096, and the bf16 pipeline on the same tokens for comparison: ten eager calls after
three warm-up calls, the CUDA time of each kernel summed over them (no L2 flush between
calls). Divide by ten for the per-call time.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/fp8_stage_profile.py
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

import moekit
from moekit.bench.fp8 import quantize_experts
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS

CELLS = [("qwen3-30b-a3b", 4096, ("fp8_tensor", "fp8_channel", "fp8_block")),
         ("mixtral-8x7b", 4096, ("fp8_tensor",))]
CALLS = 10


def kernel_table(run) -> str:
    """The profiler's per-kernel table over CALLS calls of `run`."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            run()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=8,
                                     max_name_column_width=40)


def profile_cell(name: str, m: int, schemes: tuple[str, ...]) -> None:
    """Print the kernel tables of each scheme and of bf16 on one preset and token count."""
    device = torch.device("cuda")
    preset = PRESETS[name]
    bf16 = make_weights(preset, torch.bfloat16, device)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, device)
    for scheme in schemes:
        w = quantize_experts(bf16, scheme)

        def fp8_call(w=w, scheme=scheme):
            return moekit.fused_experts_fp8(hidden, w.w13, w.w2, topk.ids, topk.weights,
                                            scheme=scheme, activation=preset.activation,
                                            b13=w.b13, b2=w.b2)
        print(f"== {name} {scheme} M={m} ({CALLS} calls)")
        print(kernel_table(fp8_call))
        del w

    def bf16_call():
        return moekit.fused_experts(hidden, bf16.w13, bf16.w2, topk.ids, topk.weights,
                                    activation=preset.activation, b13=bf16.b13, b2=bf16.b2)
    print(f"== {name} bf16 M={m} ({CALLS} calls)")
    print(kernel_table(bf16_call))


def main() -> None:
    for name, m, schemes in CELLS:
        profile_cell(name, m, schemes)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
