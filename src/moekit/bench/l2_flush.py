"""How L2 is emptied before each timed call, and do_bench's sampling schedule around it.

A decode layer reads 25–130 MB at M = 1, about the size of L2 (50 MB on Hopper), so
every timed call starts from an empty L2 — otherwise part of the weights would be served
from the cache. Two ways to empty it:

    read  a float32 sum over a 256 MB buffer: evicts everything and leaves clean lines,
          as the layers before the experts in a serving engine do (attention reads its
          weights and the KV cache, and writes little)
    zero  `triton.testing.do_bench`'s flush, a 256 MB memset: leaves L2 full of dirty
          lines, which the timed call then writes back as its reads evict them

On an H200 the `zero` flush added 6.5–8.5 µs to every timed layer, whatever its size
(qwen3-30b-a3b at M = 1: 34.6 µs after `zero`, 27.9 after `read`, 28.3 with no flush;
bench/NOTES.md, `h200-20261202-l2-flush-experiment.json`): write-back of bytes the layer
never touched. `read` is the default; `zero` reproduces numbers measured with do_bench
(PERF.md's "numbers to beat" were).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

FLUSHES = ("read", "zero")
_BYTES = 256 * 2**20


class L2Flush:
    """A callable that empties L2 on `device` the way `kind` (one of FLUSHES) says."""

    def __init__(self, kind: str = "read", device: str | torch.device = "cuda"):
        if kind not in FLUSHES:
            raise ValueError(f"L2 flush: expected one of {FLUSHES}, got {kind!r}")
        self.kind = kind
        dtype = torch.float32 if kind == "read" else torch.int32
        self._buffer = torch.ones(_BYTES // 4, dtype=dtype, device=device)
        self._sum = torch.empty((), dtype=torch.float32, device=device)

    def __call__(self) -> None:
        if self.kind == "read":
            torch.sum(self._buffer, dim=0, out=self._sum)
        else:
            self._buffer.zero_()


def shared_flush(kind: str = "read") -> L2Flush:
    """One `L2Flush` of each kind per CUDA device, made on first use and kept (its 256 MB
    buffer is allocated once, not per timing)."""
    return _flush_on(kind, torch.cuda.current_device())


@functools.cache
def _flush_on(kind: str, device_index: int) -> L2Flush:
    return L2Flush(kind, torch.device("cuda", device_index))


def flushed_samples_ms(fn: Callable[[], object], flush: Callable[[], object],
                       warmup_ms: float, rep_ms: float) -> list[float]:
    """Per-call times (ms) of `fn`, each after `flush` (an `L2Flush`, or any work to run
    untimed before each call), CUDA events around the call alone:
    `triton.testing.do_bench`'s schedule (5 calls to estimate, then warm-up and
    measurement budgets) with the flush chosen."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = start.elapsed_time(end) / 5
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(max(1, int(rep_ms / estimate_ms)))]
    for begin, finish in events:
        flush()
        begin.record()
        fn()
        finish.record()
    torch.cuda.synchronize()
    return [begin.elapsed_time(finish) for begin, finish in events]
