"""Benchmark harness: the kernel table of PERF.md (`moekit bench`).

How the benchmark works
-----------------------
1. Ceilings are measured first, in the same run (`ceilings`): copy and read-only
   bandwidth over 4 GiB buffers, bf16 (and fp16) `torch.mm` and fp8 `_scaled_mm` peaks
   on 8192³. Clocks drift under power limits, so floors never use datasheet numbers.
2. For each preset of the model registry (`presets`) the expert weights are drawn once
   on the GPU (random normal, 1/sqrt(fan_in)); for each token count M, tokens and a
   seeded softmax top-k routing are drawn (`inputs`), balanced or skewed.
3. Each implementation — moekit's `fused_experts` and two plain-PyTorch baselines
   (`baselines`: transformers-style per-expert loop, `torch._grouped_mm`) — is called
   once, checked against `moekit.reference.fused_experts` in float32 (rel_err), then
   timed eager on `triton.testing.do_bench`'s schedule (L2 emptied before each call by
   a read, `l2_flush`, or do_bench's memset with --l2-flush zero; median) and, for M ≤ 512,
   as CUDA-graph replay (`timing`; calls that synchronise with the host are not
   captured). `torch._grouped_mm` is first tried on its edge cases in a child process
   (`probe`), so a library fault cannot take the run's CUDA context down with it.
4. The roofline (`roofline`) turns each time into roofline %: floor = max(bytes of
   the experts hit + hidden + out ÷ memory bandwidth, GEMM flops ÷ matmul peak).
5. Rows stream into a JSON record and a Markdown table (`results`) under
   bench/results/<device>-<yyyymmdd>-<what>.{json,md}; `table` runs the loop and
   `command` holds the CLI options.

Without CUDA the same pipeline runs a tiny, labelled CPU table of the reference.
"""

from moekit.bench.presets import PRESETS, TOKEN_COUNTS, Preset

__all__ = ["PRESETS", "TOKEN_COUNTS", "Preset"]
