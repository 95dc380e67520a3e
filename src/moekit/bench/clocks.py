"""SM clock and board power while a table runs, sampled by nvidia-smi in the background.

A cell's time depends on the clock it ran at, and Hopper boards move their clocks under
the power limit: PERF.md saw the H100's bf16 matmul peak anywhere in 680–800 TFLOP/s,
and session 42 (bench/NOTES.md) found H100 prefill cells at a smaller share of the
same run's peak than on an H200, which throttling or the kernels could each explain.
So the table records, beside every row's wall-clock window (`window_s`), the median SM
clock and power nvidia-smi sampled inside it, and the same for the matmul peaks.

Sampling runs in its own process (`nvidia-smi --query-gpu ... --loop-ms`), read by a thread,
so timing is untouched; each sample carries nvidia-smi's own timestamp, so output that
arrives late still lands in the right window. Without nvidia-smi (the CPU, a container
without it) nothing is sampled and rows carry no clock keys. Nothing here may fail a
table: errors become a note.
"""

from __future__ import annotations

import atexit
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

_QUERY = "timestamp,clocks.sm,power.draw"
_PERIOD_MS = 100


def parse_sample(line: str) -> tuple[float, float, float | None] | None:
    """One `timestamp, clocks.sm, power.draw` line (csv, noheader, nounits) → (wall-clock
    seconds, MHz, W or None); None for a line that is not a sample."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 3:
        return None
    try:
        when = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        mhz = float(parts[1])
    except ValueError:
        return None
    try:
        watts = float(parts[2])
    except ValueError:  # "[N/A]" on boards that do not report power
        watts = None
    return when, mhz, watts


def summarize(samples: list[tuple[float, float, float | None]], start: float, end: float
              ) -> dict | None:
    """Median SM clock (MHz) and power (W) of the samples taken in [start, end], with
    their count; None when none fell inside (a window shorter than the period)."""
    inside = [s for s in samples if start <= s[0] <= end]
    if not inside:
        return None
    watts = [s[2] for s in inside if s[2] is not None]
    return {"sm_clock_mhz": round(statistics.median(s[1] for s in inside)),
            "power_w": round(statistics.median(watts)) if watts else None,
            "clock_samples": len(inside)}


class ClockLog:
    """nvidia-smi sampling one GPU (`device_id`: its UUID as `GPU-…`, or nvidia-smi's
    index) for as long as the log is open."""

    def __init__(self, device_id: str, period_ms: int = _PERIOD_MS):
        self.samples: list[tuple[float, float, float | None]] = []
        self.error: str | None = None
        self._proc = None
        self._reader = None
        smi = shutil.which("nvidia-smi")
        if smi is None:
            self.error = "no nvidia-smi on PATH: clocks not sampled"
            return
        command = [smi, f"--query-gpu={_QUERY}", "--format=csv,noheader,nounits",
                   f"--loop-ms={period_ms}", f"--id={device_id}"]
        stdbuf = shutil.which("stdbuf")  # line-buffered, so a stopped run keeps its samples
        try:
            self._proc = subprocess.Popen(([stdbuf, "-oL"] if stdbuf else []) + command,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          text=True)
        except OSError as exc:
            self.error = f"nvidia-smi failed to start: {exc}"
            return
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        atexit.register(self.close)  # however the table ends, no nvidia-smi left running

    def _read(self) -> None:
        for line in self._proc.stdout:
            sample = parse_sample(line)
            if sample is not None:
                self.samples.append(sample)  # read after `close` joins this thread

    def close(self) -> None:
        """Stop sampling; the samples so far stay (and `error` says why there are none)."""
        if self._proc is None:
            return
        exited = self._proc.poll()  # nvidia-smi gave up (a bad --id, no permission)?
        if exited is None:
            self._proc.send_signal(signal.SIGINT)  # its loop ends cleanly on Ctrl-C
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._reader.join(timeout=2)
        self._proc = None
        if not self.samples and self.error is None:
            self.error = (f"nvidia-smi exited ({exited}) with no samples" if exited is not None
                          else "nvidia-smi gave no samples")


@contextmanager
def window(into: dict, name: str) -> Iterator[None]:
    """Record the wall-clock [start, end] of the block as `into[name]`."""
    start = time.time()
    try:
        yield
    finally:
        into[name] = [start, time.time()]


def annotate(rows: list[dict], windows: dict, samples: list) -> dict | None:
    """Add each row's clocks (from its `window_s`) in place, and return the clocks of the
    named `windows` (the ceilings' measurements); None without samples."""
    if not samples:
        return None
    for row in rows:
        span = row.get("window_s")
        if span:
            found = summarize(samples, *span)
            if found:
                row.update(found)
    return {name: summarize(samples, *span) for name, span in windows.items()}
