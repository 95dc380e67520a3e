"""The kernel table: every preset × token count × implementation, timed and checked.

For each preset the weights are drawn once on the device and freed before the next
(deepseek-v3 bf16 is ~22 GB). For each token count M the runner draws tokens and
routing, computes the float32 reference once (on a row sample for large M), counts
the experts hit, and derives the roofline cost; then for each implementation it

    1. calls it once (compiles kernels; a failure becomes a note and the run goes on),
    2. checks the output against the reference (rel_err),
    3. times eager calls, and for M ≤ graph_max_m the replay of a captured CUDA graph,
    4. yields one row per timing mode (PERF.md's row schema plus extra keys).

Rows are yielded as they are measured so a caller can write partial results if the
run dies (`CudaContextLost`).
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TextIO

import torch

import moekit
from moekit.bench.baselines import BASELINES
from moekit.bench.ceilings import Ceilings
from moekit.bench.clocks import window
from moekit.bench.fp8 import (
    FP8_DTYPES,
    is_fp8,
    moekit_fp8,
    quantised_reference,
    quantize_experts,
    weight_bytes_per_element,
)
from moekit.bench.inputs import (
    ExpertWeights,
    experts_hit,
    make_tokens,
    make_weights,
    reference_output,
    reference_rows,
    rel_err,
)
from moekit.bench.presets import Preset
from moekit.bench.probe import probe_grouped_mm
from moekit.bench.roofline import Cost, achieved, moe_cost
from moekit.bench.timing import (
    CaptureFailed,
    CudaContextLost,
    Timing,
    check_cuda_alive,
    short_error,
)

# The dtype of hidden and out per table dtype; fp8 tables quantise bf16 weights.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16,
          **{name: torch.bfloat16 for name in FP8_DTYPES}}
# DESIGN.md, "Accuracy": relative L2 error bounds against the float32 reference (for fp8,
# the reference on the same quantised weights).
REL_ERR_TOL = {"bf16": 1e-2, "fp16": 5e-3, **{name: 1e-2 for name in FP8_DTYPES}}


@dataclass(frozen=True)
class Impl:
    """An implementation of fused_experts in the table.

    Attributes:
        name: the row's `impl` ("moekit", "torch_loop", "torch_grouped_mm").
        fn: fused_experts-compatible callable (hidden, w13, w2, ids, weights, *,
            activation, b13, b2) -> [M, H].
        capturable: False when it is known to synchronise with the host, so no graph
            capture is attempted; `why_not` says why.
        probe: optional canary `probe(dtype) -> reason | None` run in a child process
            before a CUDA table (see `moekit.bench.probe`).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    capturable: bool = True
    why_not: str = ""
    probe: Callable[[str], str | None] | None = None


def _moekit_fused_experts(hidden, w13, w2, topk_ids, topk_weights, *, activation, b13, b2):
    return moekit.fused_experts(hidden, w13, w2, topk_ids, topk_weights,
                                activation=activation, b13=b13, b2=b2)


def implementations(baselines: bool = True, dtype: str = "bf16") -> list[Impl]:
    """moekit first, then (optionally) the plain-PyTorch baselines, which have no fp8 path."""
    if is_fp8(dtype):
        return [Impl("moekit", moekit_fp8(dtype))]
    impls = [Impl("moekit", _moekit_fused_experts)]
    if baselines:
        impls.append(Impl("torch_grouped_mm", BASELINES["torch_grouped_mm"],
                          probe=probe_grouped_mm))
        impls.append(Impl("torch_loop", BASELINES["torch_loop"], capturable=False,
                          why_not="not graph-captured: it synchronises (nonzero → host list)"))
    return impls


def screen(impls: list[Impl], dtype: str) -> tuple[list[Impl], list[str]]:
    """Run each implementation's probe; drop those that fail. Returns (kept, notes)."""
    kept, notes = [], []
    for impl in impls:
        reason = impl.probe(dtype) if impl.probe is not None else None
        if reason is None:
            kept.append(impl)
        else:
            notes.append(f"{impl.name} left out: {reason}")
    return kept, notes


@dataclass(frozen=True)
class TableConfig:
    """What to run. `graph_max_m`: largest M also timed as CUDA-graph replay."""

    presets: tuple[Preset, ...]
    tokens: tuple[int, ...]
    dtype: str = "bf16"
    routing: str = "balanced"
    graph: bool = True
    graph_max_m: int = 512
    ref_rows: int = 256
    seed: int = 0

    def graph_planned(self, impl: Impl, num_tokens: int, device: torch.device) -> bool:
        return impl.capturable and self.graph_wanted(num_tokens, device)

    def graph_wanted(self, num_tokens: int, device: torch.device) -> bool:
        """Whether cells of this M get a CUDA-graph row (for capturable impls)."""
        return self.graph and device.type == "cuda" and num_tokens <= self.graph_max_m

    def planned(self, impls: list[Impl], device: torch.device) -> int:
        """Number of timings the run will report (progress counter total)."""
        return sum(1 + self.graph_planned(impl, m, device)
                   for _ in self.presets for m in self.tokens for impl in impls)


class Progress:
    """One line per timing on stderr: count, cell, result, and a rough ETA."""

    def __init__(self, total: int, stream: TextIO | None = None):
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()

    def step(self, text: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        eta = f"eta {int(left // 60)}m{int(left % 60):02d}s" if self.done < self.total else "done"
        width = len(str(self.total))
        print(f"[{self.done:>{width}}/{self.total}] {text}  ({eta})", file=self.stream, flush=True)


def _round(x: float | None, digits: int = 4) -> float | None:
    """Round to `digits` significant digits; None for missing or non-finite values."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def make_row(preset: Preset, num_tokens: int, config: TableConfig, impl: str, graph: bool,
             timing: Timing | None, cost: Cost, ceilings: Ceilings, err: float | None,
             hit: int, checked_rows: int, note: str | None,
             extra_note: str | None = None, extra: dict | None = None) -> dict:
    """One result row: PERF.md's required keys first, then the extra keys.

    Args:
        timing: None when the implementation failed (times and rates are then null).
        err: rel_err of this mode's output, None when not computed.
        extra: more keys for the row (fp8: rel_err_bf16).
    """
    peak = ceilings.matmul_TFLOPs(config.dtype)
    floor = cost.floor_us(ceilings.mem_GBps, peak)
    time_us = timing.median_us if timing else None
    gbps, tflops = achieved(cost, time_us) if time_us else (None, None)
    notes = [n for n in (timing.note if timing else None, note, extra_note) if n]
    return {
        "preset": preset.name, "E": preset.num_experts, "topk": preset.top_k,
        "H": preset.hidden, "I": preset.inter, "M": num_tokens, "dtype": config.dtype,
        "impl": impl, "graph": graph,
        "time_us": _round(time_us), "floor_us": _round(floor),
        "roofline_pct": _round(floor / time_us * 100, 3) if time_us else None,
        "GBps": _round(gbps), "TFLOPs": _round(tflops), "rel_err": _round(err, 3),
        # extra keys
        "activation": preset.activation, "bias": preset.bias, "routing": config.routing,
        "experts_hit": hit, "bytes": int(cost.bytes), "flops": int(cost.flops),
        "bound": cost.bound(ceilings.mem_GBps, peak),
        "p20_us": _round(timing.p20_us) if timing else None,
        "p80_us": _round(timing.p80_us) if timing else None,
        "reps": timing.reps if timing else 0,
        "back_to_back_us": _round(timing.back_to_back_us) if timing else None,
        "rel_err_rows": checked_rows,
        "rel_err_ok": None if err is None else bool(err <= REL_ERR_TOL[config.dtype]),
        "note": "; ".join(notes) or None,
        **(extra or {}),
    }


def _describe(row: dict) -> str:
    mode = "graph" if row["graph"] else "eager"
    head = f"{row['preset']} M={row['M']} {row['impl']} {mode}"
    if row["time_us"] is None:
        return f"{head} FAILED: {row['note']}"
    err = row["rel_err"]
    flag = "" if row["rel_err_ok"] is not False else "  REL_ERR OVER TOLERANCE"
    return (f"{head} {row['time_us']:.1f} µs {row['roofline_pct']:.0f}% roofline "
            f"rel_err {err if err is not None else float('nan'):.1e}{flag}")


def run_table(config: TableConfig, impls: list[Impl], timer, ceilings: Ceilings,
              device: torch.device, progress: Progress | None = None) -> Iterator[dict]:
    """Measure every cell; yield rows as they are measured.

    Args:
        timer: `CudaTimer` or `CpuTimer` (moekit.bench.timing).
        ceilings: measured in this run; the floors use them.
    Raises:
        CudaContextLost: the device is unusable; rows yielded so far are valid.
    """
    progress = progress or Progress(config.planned(impls, device))
    for preset in config.presets:
        weights = make_weights(preset, DTYPES[config.dtype], device, config.seed)
        try:
            yield from _preset_rows(preset, weights, config, impls, timer, ceilings, device,
                                    progress)
        finally:
            # Nothing else may hold the weights here, or the next preset runs out of memory.
            del weights
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _preset_rows(preset: Preset, weights: ExpertWeights, config: TableConfig,
                 impls: list[Impl], timer, ceilings: Ceilings, device: torch.device,
                 progress: Progress) -> Iterator[dict]:
    """Rows of one preset, token count by token count."""
    dtype = DTYPES[config.dtype]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    elt = torch.empty((), dtype=dtype).element_size()
    fp8 = is_fp8(config.dtype)
    # The weights the implementations run on: fp8 tables quantise once per preset.
    run_weights = quantize_experts(weights, config.dtype) if fp8 else weights
    weight_bytes = weight_bytes_per_element(preset, config.dtype) if fp8 else elt
    for m in config.tokens:
        hidden, topk = make_tokens(preset, m, dtype, device, config.routing, config.seed)
        rows = reference_rows(m, config.ref_rows, config.seed)
        ref_bf16 = None
        try:
            ref = reference_output(hidden, weights, topk, preset.activation, rows)
            if fp8:
                ref_bf16, ref = ref, quantised_reference(hidden, run_weights, topk,
                                                         config.dtype, preset.activation, rows)
            check = partial(rel_err, ref=ref, rows=rows)
            ref_note = None
        except Exception as exc:  # keep timing; the rows say the check is missing
            if cuda:
                check_cuda_alive()
            check = lambda out: None
            ref_note = f"reference failed: {short_error(exc)}"
        hit = experts_hit(topk.ids, preset.num_experts)
        cost = moe_cost(m, preset.top_k, preset.hidden, preset.inter, preset.gemm1_rows,
                        hit, weight_bytes=weight_bytes, act_bytes=elt, bias=preset.bias,
                        bias_bytes=elt)
        row = partial(make_row, preset, m, config, cost=cost, ceilings=ceilings, hit=hit,
                      checked_rows=m if rows is None else len(rows), extra_note=ref_note)
        for impl in impls:
            call = partial(impl.fn, hidden, run_weights.w13, run_weights.w2, topk.ids,
                           topk.weights, activation=preset.activation, b13=run_weights.b13,
                           b2=run_weights.b2)
            graph = config.graph_planned(impl, m, device)
            impl_row = row
            if fp8:
                impl_row = partial(row, extra={"rel_err_bf16": _error_vs_bf16(
                    call, ref_bf16, rows, sync)})
            results = _measure(impl, call, check, timer, graph, cuda, sync, impl_row,
                               uncaptured=config.graph_wanted(m, device))
            for result in results:
                progress.step(_describe(result))
                yield result
            progress.done += 1 + graph - len(results)  # planned steps that gave no row


def _error_vs_bf16(call, ref_bf16: torch.Tensor | None, rows, sync) -> float | None:
    """rel_err of one call's output against the bf16 weights' reference (fp8 tables):
    the format's own error. None when the reference or the call failed (the timing
    that follows reports the failure)."""
    if ref_bf16 is None:
        return None
    try:
        out = call()
        sync()
        return _round(rel_err(out, ref_bf16, rows), 3)
    except CudaContextLost:
        raise
    except Exception:
        return None


def _measure(impl: Impl, call, check, timer, graph: bool, cuda: bool, sync,
             row: Callable[..., dict], uncaptured: bool) -> list[dict]:
    """Eager (and graph) rows of one implementation on one cell.

    Args:
        graph: capture and time a CUDA graph too.
        uncaptured: a graph row was wanted for this M; when `graph` is False the eager
            row says why there is none.
    """
    spans: dict = {}  # wall-clock [start, end] of each timing, for the clocks sampled then
    try:
        out = call()
        sync()
        err = check(out)
        del out
        with window(spans, "eager"):
            eager = timer.eager(call)
    except CudaContextLost:
        raise
    except Exception as exc:  # any failure of the implementation becomes a note
        if cuda:
            check_cuda_alive()
        return [row(impl=impl.name, graph=False, timing=None, err=None,
                    note=f"failed: {short_error(exc)}")]
    note = None
    rows = []
    if graph:
        try:
            with window(spans, "graph"):
                timing, graph_err = timer.graph(call, check)
            rows.append(_in_window(row(impl=impl.name, graph=True, timing=timing,
                                       err=graph_err, note=None), spans["graph"]))
        except CaptureFailed as exc:
            note = f"graph capture failed: {exc}"
        except CudaContextLost:
            raise
        except Exception as exc:
            if cuda:
                check_cuda_alive()
            note = f"graph timing failed: {short_error(exc)}"
    elif uncaptured:
        note = impl.why_not or None
    return [_in_window(row(impl=impl.name, graph=False, timing=eager, err=err, note=note),
                       spans["eager"]), *rows]


def _in_window(row: dict, span: list[float]) -> dict:
    """`row` with the wall-clock seconds its timing ran in (`window_s`), which
    `moekit.bench.clocks.annotate` matches with the clocks sampled meanwhile."""
    row["window_s"] = [round(t, 3) for t in span]
    return row
