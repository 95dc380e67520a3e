"""The device's ceilings, measured in the same run as the table they normalise.

Clocks move under power limits, so a floor computed from a datasheet or from last
week's run would mis-state roofline %. PERF.md fixes the recipe:

- copy_GBps: device-to-device copy of a 4 GiB buffer, bytes read + written ÷ time;
- read_GBps: a load-bound pass over 4 GiB of float32, bytes read ÷ time: the faster of
  `torch.sum` and `stream_read` (a Triton kernel of 16-byte loads; CUDA only);
- mem_GBps = max(copy, read): MoE weights are read, not copied;
- matmul peaks: an 8192³ product on random data — bf16 (and fp16 when the table is
  fp16) through `torch.mm` with B stored [N, K] like expert weights, fp8 e4m3 through
  `torch._scaled_mm` with per-tensor scales (null when unavailable).

On the CPU the same quantities are measured on small buffers only so the CPU table
has a floor; they are not a statement about the machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from moekit.bench.clocks import window
from moekit.bench.l2_flush import flushed_samples_ms, shared_flush
from moekit.bench.stream_read import stream_read
from moekit.bench.timing import short_error

GiB = 1 << 30


@dataclass
class Ceilings:
    """Measured ceilings. Bandwidths in GB/s (1e9 bytes/s), peaks in TFLOP/s."""

    copy_GBps: float
    read_GBps: float
    bf16_TFLOPs: float
    fp16_TFLOPs: float | None = None
    fp8_TFLOPs: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def mem_GBps(self) -> float:
        """The bandwidth the floor uses: the larger of copy and read."""
        return max(self.copy_GBps, self.read_GBps)

    def matmul_TFLOPs(self, dtype: str) -> float:
        """Peak for a weight dtype name ("bf16", "fp16", "fp8_tensor", "fp8_channel", …)."""
        if dtype.startswith("fp8"):
            peak = self.fp8_TFLOPs
        else:
            peak = self.fp16_TFLOPs if dtype == "fp16" else self.bf16_TFLOPs
        if peak is None:
            raise ValueError(f"no matmul peak measured for {dtype}")
        return peak

    def summary(self) -> str:
        """One line for the terminal."""
        fmt = lambda x: "n/a" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.3g}")
        line = (f"copy {fmt(self.copy_GBps)} GB/s, read {fmt(self.read_GBps)} GB/s, "
                f"bf16 {fmt(self.bf16_TFLOPs)} TFLOP/s")
        if self.fp16_TFLOPs is not None:
            line += f", fp16 {fmt(self.fp16_TFLOPs)} TFLOP/s"
        return line + f", fp8 {fmt(self.fp8_TFLOPs)}" + (" TFLOP/s" if self.fp8_TFLOPs else "")

    def to_json(self) -> dict:
        """The JSON `ceilings` object, four significant digits (PERF.md keys + notes)."""
        doc = {k: (float(f"{v:.4g}") if isinstance(v, float) else v)
               for k, v in asdict(self).items()}
        doc["mem_GBps"] = max(doc["copy_GBps"], doc["read_GBps"])
        return doc


def _median_ms(fn, reps: int | None = None, rep_ms: float = 200) -> float:
    """Median time of `fn` in ms: do_bench's schedule with a read flush of L2 on CUDA
    (`l2_flush`), perf_counter on the CPU."""
    if reps is None:
        return statistics.median(flushed_samples_ms(fn, shared_flush("read"), 25, rep_ms))
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return sorted(samples)[len(samples) // 2]


def _bandwidths(numel: int, device: str, reps: int | None) -> tuple[float, float]:
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    copy_ms = _median_ms(lambda: dst.copy_(src), reps)
    read_ms = _median_ms(lambda: torch.sum(src), reps)
    if device != "cpu":
        partials = stream_read(src)
        read_ms = min(read_ms, _median_ms(lambda: stream_read(src, partials), reps))
    return 2 * nbytes / copy_ms / 1e6, nbytes / read_ms / 1e6


def _matmul_TFLOPs(n: int, dtype: torch.dtype, device: str, reps: int | None) -> float:
    a = torch.randn((n, n), dtype=dtype, device=device)
    b = torch.randn((n, n), dtype=dtype, device=device)  # [N, K], used transposed
    ms = _median_ms(lambda: torch.mm(a, b.t()), reps)
    return 2 * n**3 / ms / 1e9


def _fp8_TFLOPs(n: int) -> float:
    a = torch.randn((n, n), device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn((n, n), device="cuda").to(torch.float8_e4m3fn)  # [N, K] row-major
    one = torch.ones((), dtype=torch.float32, device="cuda")
    fn = lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    return 2 * n**3 / _median_ms(fn) / 1e9


def measure_cuda(dtype: str = "bf16", buffer_bytes: int = 4 * GiB, n: int = 8192,
                 windows: dict | None = None) -> Ceilings:
    """Measure the ceilings on the current CUDA device (about two seconds).

    Args:
        dtype: weight dtype of the table; "fp16" adds the fp16 matmul peak.
        buffer_bytes: size of the bandwidth buffers (PERF.md: ≥ 4 GB).
        n: matmul size (PERF.md: 8192).
        windows: if given, receives the wall-clock [start, end] of each measurement
            ("bandwidth", "bf16", "fp16", "fp8"; `moekit.bench.clocks`).
    """
    windows = {} if windows is None else windows
    with window(windows, "bandwidth"):
        copy, read = _bandwidths(buffer_bytes // 4, "cuda", None)
    torch.cuda.empty_cache()
    with window(windows, "bf16"):
        bf16 = _matmul_TFLOPs(n, torch.bfloat16, "cuda", None)
    fp16 = None
    if dtype == "fp16":
        with window(windows, "fp16"):
            fp16 = _matmul_TFLOPs(n, torch.float16, "cuda", None)
    ceilings = Ceilings(copy, read, bf16, fp16)
    try:
        with window(windows, "fp8"):
            ceilings.fp8_TFLOPs = _fp8_TFLOPs(n)
    except Exception as exc:  # fp8 needs sm89+ and a recent torch; record why not
        ceilings.notes.append(f"fp8 peak unavailable: {short_error(exc)}")
    ceilings.notes.append(
        f"copy/read over {buffer_bytes / GiB:g} GiB float32 (read: the faster of torch.sum and "
        f"a Triton stream of 16-byte loads); matmul {n}^3 random data, "
        "median of do_bench-schedule reps (L2 read-flushed); fp8 via torch._scaled_mm e4m3 "
        "per-tensor scales"
    )
    torch.cuda.empty_cache()
    return ceilings


def measure_cpu(dtype: str = "bf16") -> Ceilings:
    """Rough CPU ceilings on small buffers (64 MiB, 256³), for the CPU table only."""
    copy, read = _bandwidths(16 << 20, "cpu", reps=5)
    bf16 = _matmul_TFLOPs(256, torch.bfloat16, "cpu", reps=5)
    fp16 = _matmul_TFLOPs(256, torch.float16, "cpu", reps=5) if dtype == "fp16" else None
    notes = ["CPU: 64 MiB buffers and a 256^3 matmul; rough, not the PERF.md protocol"]
    fp8 = None
    if dtype.startswith("fp8"):  # no fp8 matmul on the CPU: the bf16 one stands in
        fp8 = bf16
        notes.append("CPU: the fp8 peak is the bf16 matmul's (no fp8 matmul on the CPU)")
    return Ceilings(copy_GBps=copy, read_GBps=read, bf16_TFLOPs=bf16, fp16_TFLOPs=fp16,
                    fp8_TFLOPs=fp8, notes=notes)
