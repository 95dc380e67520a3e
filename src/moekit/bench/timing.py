"""How a cell is timed: eager calls, CUDA-graph replay, and a CPU stand-in.

CUDA (PERF.md, "Timing rules"):
- eager: `triton.testing.do_bench`'s schedule, L2 emptied before every repetition
  (`moekit.bench.l2_flush`: by default a 256 MB read, which leaves clean lines; do_bench's
  own memset leaves dirty ones and measured 6.5–8.5 µs slower per call) and each call
  bracketed with CUDA events; we keep every sample and report the median (plus the
  20th/80th percentiles). The flush matters: at small M only a few experts are read and
  their weights can fit in the 50 MB L2. The flush also
  keeps the GPU busy while the host launches, so the eager time is GPU time; launch
  cost shows in `back_to_back_us`, the mean of N calls issued back to back (for
  calls under 2 ms, where launch cost can matter).
- graph: static inputs, the call warmed on a side stream, captured once with
  `torch.cuda.graph`, and `graph.replay` timed exactly like an eager call.
- a hard cap per cell: when one call is so slow that do_bench's minimum of eight calls
  would exceed `cell_cap_s`, the median of three single calls is reported instead.

A CUDA error that poisons the context (an illegal address) raises `CudaContextLost`;
everything else (a shape the op refuses, a sync inside graph capture) is reported as
a note on the cell and the run goes on.

CPU: wall-clock medians with `time.perf_counter`, for the labelled CPU table only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moekit.bench.l2_flush import flushed_samples_ms, shared_flush

BACK_TO_BACK_MAX_US = 2000.0  # eager calls slower than this skip the back-to-back figure


@dataclass(frozen=True)
class Timing:
    """Samples of one cell, in µs: median (the figure), 20th/80th percentile, count."""

    median_us: float
    p20_us: float
    p80_us: float
    reps: int
    back_to_back_us: float | None = None
    note: str | None = None

    @classmethod
    def from_samples(cls, samples_us: list[float], **extra) -> Timing:
        ordered = sorted(samples_us)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
        return cls(statistics.median(ordered), pick(0.2), pick(0.8), len(ordered), **extra)


class CaptureFailed(RuntimeError):
    """The call could not be captured in a CUDA graph; the eager row still stands."""


class CudaContextLost(RuntimeError):
    """The CUDA context is unusable (sticky error); the run must stop."""


def short_error(exc: BaseException, limit: int = 160) -> str:
    """First line of an exception, prefixed by its type, at most `limit` characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    msg = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def check_cuda_alive() -> None:
    """Raise CudaContextLost unless a synchronise and a tiny kernel still work."""
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
    except Exception as exc:  # any failure here means the context is gone
        raise CudaContextLost(short_error(exc)) from exc


def _refuse_host_syncs(fn: Callable[[], object]) -> None:
    """Call `fn` with torch's sync debug mode on "error"; CaptureFailed if it synchronises.

    A synchronising call (`.item()`, `nonzero`, a pageable copy) cannot be captured, and
    a capture that fails half-way leaves the allocator with a stale capture filter. So
    syncs are caught here, outside any capture, and most capture failures never happen.
    """
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as exc:  # torch raises "called a synchronizing CUDA operation"
        if "synchroniz" not in str(exc):
            raise
        reason = short_error(exc, 100)
    else:
        return
    finally:
        torch.cuda.set_sync_debug_mode(mode)
    raise CaptureFailed(f"synchronises with the host ({reason})")


class CudaTimer:
    """Eager and CUDA-graph timing on the current CUDA device.

    Args:
        warmup_ms, rep_ms: do_bench's warm-up and measurement budgets per timing.
        cell_cap_s: above this (estimated) cost a timing falls back to three calls.
        back_to_back_ms: budget of the back-to-back launch measurement of eager calls.
        l2_flush: how L2 is emptied before each timed call (`moekit.bench.l2_flush`).
    """

    device = "cuda"

    def __init__(self, warmup_ms: float = 10, rep_ms: float = 100, cell_cap_s: float = 4.0,
                 back_to_back_ms: float = 20, l2_flush: str = "read"):
        self.flush = shared_flush(l2_flush)
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.cell_cap_ms = cell_cap_s * 1e3
        self.back_to_back_ms = back_to_back_ms

    @staticmethod
    def _one_call_ms(fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def _samples(self, fn: Callable[[], object]) -> tuple[list[float], str | None]:
        """Per-call times in µs: do_bench's schedule, or three calls for a slow cell."""
        one = self._one_call_ms(fn)
        # do_bench runs at least 1 + 5 + 1 + 1 calls plus its warm-up budget.
        if 8 * one + self.warmup_ms > self.cell_cap_ms:
            # A first call's one-off work can make a fast cell look slow (session 32: a
            # replay's recording, with the process's first torch._dynamo import, 3.7 s
            # at mixtral M = 1, then 0.18 ms): look once more before giving up on it.
            one = self._one_call_ms(fn)
        if 8 * one + self.warmup_ms > self.cell_cap_ms:
            samples = [one] + [self._one_call_ms(fn) for _ in range(2)]
            return [t * 1e3 for t in samples], f"slow cell ({one:.0f} ms/call): median of 3 calls"
        samples = flushed_samples_ms(fn, self.flush, self.warmup_ms, self.rep_ms)
        return [t * 1e3 for t in samples], None

    def _back_to_back_us(self, fn: Callable[[], object], median_us: float) -> float:
        reps = max(5, min(200, int(self.back_to_back_ms * 1e3 / max(median_us, 1.0))))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / reps

    def eager(self, fn: Callable[[], object]) -> Timing:
        """Time `fn` (already warmed up, e.g. compiled by a first call)."""
        samples, note = self._samples(fn)
        timing = Timing.from_samples(samples, note=note)
        # Launch overhead only matters next to short calls; skip it for long ones.
        if note is None and self.back_to_back_ms > 0 and timing.median_us < BACK_TO_BACK_MAX_US:
            b2b = self._back_to_back_us(fn, timing.median_us)
            timing = Timing.from_samples(samples, back_to_back_us=b2b)
        return timing

    def graph(self, fn: Callable[[], torch.Tensor],
              check: Callable[[torch.Tensor], float]) -> tuple[Timing, float]:
        """Capture `fn` in a CUDA graph, time its replay, and `check` the replayed output.

        Args:
            fn: the call on static inputs; returns the output tensor.
            check: maps the graph's output (after the timed replays) to its rel_err.
        Returns:
            (Timing of `graph.replay`, check(output)).
        Raises:
            CaptureFailed when `fn` synchronises with the host or capture (or the first
            replay) fails; CudaContextLost when the context did not survive it.
        """
        caller = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(caller)
        with torch.cuda.stream(side):  # warm-up allocations off the capture stream
            try:
                _refuse_host_syncs(fn)
                fn()
            finally:
                caller.wait_stream(side)
        graph = None
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn()
            graph.replay()
            torch.cuda.synchronize()
        except Exception as exc:  # report any capture failure on the cell
            # If capture_end raises, torch.cuda.graph leaves its capture stream current.
            torch.cuda.set_stream(caller)
            del graph
            check_cuda_alive()
            raise CaptureFailed(short_error(exc)) from exc
        try:
            samples, note = self._samples(graph.replay)
            err = check(out)
        finally:
            del out, graph
        return Timing.from_samples(samples, note=note), err


class CpuTimer:
    """Wall-clock medians for the CPU table: at least 3 calls, then until `budget_ms`."""

    device = "cpu"

    def __init__(self, budget_ms: float = 30, max_reps: int = 50):
        self.budget_ms = budget_ms
        self.max_reps = max_reps

    def eager(self, fn: Callable[[], object]) -> Timing:
        samples: list[float] = []
        deadline = time.perf_counter() + self.budget_ms * 1e-3
        while len(samples) < 3 or (len(samples) < self.max_reps and time.perf_counter() < deadline):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        return Timing.from_samples(samples)

    def graph(self, fn, check):  # same interface as CudaTimer
        raise CaptureFailed("no CUDA graphs on the CPU")


def graph_replay_us(fn: Callable[[], object], rep_ms: float = 50,
                    l2_flush: str | Callable[[], object] = "read") -> float:
    """Median µs of CUDA-graph replay of `fn` alone, L2 emptied (`l2_flush`, a kind of
    `moekit.bench.l2_flush.FLUSHES`) before each replay — or, given a callable, that run
    (untimed) before each instead.

    For the studies under bench/scripts, which time single stages or variants of them;
    the kernel table uses `CudaTimer.graph` (side-stream warm-up, capture checks).
    """
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    before = shared_flush(l2_flush) if isinstance(l2_flush, str) else l2_flush
    samples = flushed_samples_ms(graph.replay, before, 10, rep_ms)
    return statistics.median(samples) * 1e3
