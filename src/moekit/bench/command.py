"""`moekit bench`: the options of the kernel table and the run that writes its files.

This is the only place that knows about argv, stdout/stderr and the file system; the
measuring lives in `moekit.bench.table`. Without CUDA (or with --cpu) it runs a small,
clearly labelled CPU table of the reference implementation so the whole pipeline —
options, rows, files — can be exercised anywhere in seconds.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from moekit.bench.args import preset_names, token_counts
from moekit.bench.fp8 import FP8_DTYPES, is_fp8
from moekit.bench.inputs import ROUTINGS
from moekit.bench.l2_flush import FLUSHES
from moekit.bench.presets import (
    CPU_TOKEN_COUNTS,
    EXTRA_PRESETS,
    PRESETS,
    TOKEN_COUNTS,
    cpu_preset,
    get_preset,
)

DEFAULT_OUT = "bench/results"
NO_CUDA_LINE = ("no CUDA device: running a small CPU table of the reference implementation "
                "— not a performance result")
FORCED_CPU_LINE = ("--cpu: running a small CPU table of the reference implementation "
                   "— not a performance result")


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `moekit bench`."""
    what = parser.add_argument_group("what to run")
    what.add_argument("--presets", nargs="+", type=preset_names, action="extend",
                      metavar="NAME", help="presets, space- or comma-separated "
                      f"(default: all of PERF.md: {', '.join(PRESETS)}; "
                      f"also: {', '.join(EXTRA_PRESETS)})")
    what.add_argument("--tokens", nargs="+", type=token_counts, action="extend", metavar="M",
                      help="token counts (default: 1 2 4 … 16384; on the CPU: 1 16 64)")
    what.add_argument("--dtype", choices=("bf16", "fp16", *FP8_DTYPES), default="bf16",
                      help="weight and activation dtype; fp8_*: fp8 weights in that "
                      "moekit.quant scheme with bf16 tokens, no baselines (default: bf16)")
    what.add_argument("--routing", choices=ROUTINGS, default="balanced",
                      help="balanced: softmax over random logits; skewed: a few experts "
                      "take most tokens (default: balanced)")
    what.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                      help="also run torch_grouped_mm and torch_loop (default: on)")
    what.add_argument("--cpu", action="store_true",
                      help="run the small CPU table even when CUDA is available")

    timing = parser.add_argument_group("timing")
    timing.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True,
                        help="also time CUDA-graph replay for M ≤ --graph-max-m (default: on)")
    timing.add_argument("--graph-max-m", type=_positive(int), default=512, metavar="M",
                        help="largest M timed as graph replay (default: 512)")
    timing.add_argument("--rep-ms", type=_positive(float), default=100, metavar="MS",
                        help="measurement budget per timing, ms (default: 100)")
    timing.add_argument("--warmup-ms", type=_positive(float), default=10, metavar="MS",
                        help="warm-up budget per timing, ms (default: 10)")
    timing.add_argument("--cell-cap-s", type=_positive(float), default=4.0, metavar="S",
                        help="a timing whose minimum of 8 calls would take longer is "
                        "the median of 3 calls (default: 4)")
    timing.add_argument("--l2-flush", choices=FLUSHES, default="read",
                        help="how L2 is emptied before each timed call: read (a 256 MB sum, "
                        "clean lines) or zero (do_bench's memset, whose dirty lines the timed "
                        "call writes back: +6.5–8.5 µs per call on an H200) (default: read)")
    timing.add_argument("--ref-rows", type=_positive(int), default=256, metavar="N",
                        help="rows checked against the reference when M > N (default: 256)")
    timing.add_argument("--seed", type=int, default=0, help="seed of weights, tokens, routing")

    output = parser.add_argument_group("output")
    output.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"result file directory, '-' for none (default: {DEFAULT_OUT})")
    output.add_argument("--no-write", action="store_true", help="do not write result files")
    output.add_argument("--what", default=None, metavar="LABEL",
                        help="label in the file name (default: kernels-<dtype>[-skewed])")


def _git_commit() -> str | None:
    """The commit the results come from: $MOEKIT_GIT_COMMIT when set (a copied working tree,
    as on a lent GPU machine, may carry a stale .git), else `git rev-parse HEAD`."""
    if os.environ.get("MOEKIT_GIT_COMMIT"):
        return os.environ["MOEKIT_GIT_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _flatten(groups: list[list] | None) -> list | None:
    return None if groups is None else [x for group in groups for x in group]


def run(args: argparse.Namespace) -> int:
    """Run the kernel table; print progress to stderr and the Markdown to stdout."""
    import torch
    import triton

    import moekit
    from moekit.bench import ceilings as measure
    from moekit.bench.clocks import ClockLog
    from moekit.bench.results import (
        render_markdown,
        result_paths,
        validate,
        write_files,
    )
    from moekit.bench.table import TableConfig, implementations, run_table, screen
    from moekit.bench.timing import CpuTimer, CudaContextLost, CudaTimer
    from moekit.device import device_slug

    names = list(dict.fromkeys(_flatten(args.presets) or PRESETS))
    presets = [get_preset(n) for n in names]
    tokens = _flatten(args.tokens)
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu
    impls, screen_notes = implementations(args.baselines, args.dtype), []
    clock_log, ceiling_windows = None, {}
    if cuda:
        # Before this process creates its CUDA context: a probe runs in a child process,
        # which an exclusive-process GPU would refuse while we hold one.
        if any(impl.probe for impl in impls):
            print("probing torch._grouped_mm in a child process …", file=sys.stderr, flush=True)
        impls, screen_notes = screen(impls, args.dtype)
        for note in screen_notes:
            print(note, file=sys.stderr)
        device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(device)
        device_name = props.name
        tokens = tokens or list(TOKEN_COUNTS)
        print(f"device: {device_name} (sm_{props.major}{props.minor}, "
              f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)",
              file=sys.stderr)
        clock_log = ClockLog(_smi_id(props, device))  # the clock and power each row ran at
        print("measuring ceilings …", file=sys.stderr, flush=True)
        ceilings = measure.measure_cuda(args.dtype, windows=ceiling_windows)
        timer = CudaTimer(args.warmup_ms, args.rep_ms, args.cell_cap_s, l2_flush=args.l2_flush)
    else:
        print(FORCED_CPU_LINE if args.cpu else NO_CUDA_LINE, file=sys.stderr)
        device, device_name, props = torch.device("cpu"), "cpu", None
        presets = [cpu_preset(p) for p in presets]
        tokens = tokens or list(CPU_TOKEN_COUNTS)
        ceilings = measure.measure_cpu(args.dtype)
        timer = CpuTimer(budget_ms=min(args.rep_ms, 30))
    tokens = sorted(set(tokens))
    print(f"ceilings: {ceilings.summary()}", file=sys.stderr, flush=True)

    config = TableConfig(
        presets=tuple(presets), tokens=tuple(tokens), dtype=args.dtype, routing=args.routing,
        graph=args.graph, graph_max_m=args.graph_max_m, ref_rows=args.ref_rows, seed=args.seed,
    )
    now = datetime.now().astimezone()
    header = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": now.isoformat(timespec="seconds"),
        "command": getattr(args, "command_line", None) or shlex.join(sys.argv),
        "ceilings": ceilings.to_json(),
        # extra keys
        "title": "moekit kernel table" + (" (CPU, reference)" if not cuda else ""),
        "device_slug": device_slug(device_name),
        "cpu": not cuda,
        "capability": f"sm_{props.major}{props.minor}" if props else None,
        "sm_count": props.multi_processor_count if props else None,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "moekit": moekit.__version__,
        "git_commit": _git_commit(),
        "dtype": args.dtype,
        "routing": args.routing,
        "seed": args.seed,
        "timing": {
            "method": (f"triton.testing.do_bench's schedule, L2 emptied before each call "
                       f"({args.l2_flush} flush), median" if cuda else "time.perf_counter, median"),
            "l2_flush": args.l2_flush if cuda else None,
            "rep_ms": args.rep_ms, "warmup_ms": args.warmup_ms, "cell_cap_s": args.cell_cap_s,
            "graph": bool(args.graph and cuda), "graph_max_m": args.graph_max_m,
        },
        "reference": {
            "impl": ("moekit.reference.fused_experts_quantized" if is_fp8(args.dtype)
                     else "moekit.reference.fused_experts"),
            "dtype": "float32",
            "rows": args.ref_rows,
            "note": f"rel_err on {args.ref_rows} random token rows when M > {args.ref_rows} "
                    "(rows are independent); rel_err_rows gives the count per row",
        },
        "notes": _notes(args, presets, cuda) + screen_notes,
    }
    paths = None
    if not args.no_write and args.out != "-":
        skew = "-skewed" if args.routing == "skewed" else ""
        what = args.what or f"kernels-{args.dtype}{skew}"
        paths = result_paths(args.out, header["device_slug"], now.strftime("%Y%m%d"), what)

    def document(rows: list[dict], abort: str | None) -> dict:
        return {**header, "rows": rows, "elapsed_s": round(time.perf_counter() - started, 1),
                "partial": abort is not None, "abort_reason": abort}

    rows: list[dict] = []
    abort = None
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for row in run_table(config, impls, timer, ceilings, device):
            if paths and rows and row["preset"] != rows[-1]["preset"]:
                # checkpoint after each preset, in case the run is killed outright
                write_files(document(rows, "still running (checkpoint)"), *paths)
            rows.append(row)
    except CudaContextLost as exc:
        abort = f"CUDA context lost, run stopped: {exc}"
    except KeyboardInterrupt:
        abort = "interrupted"
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if clock_log is not None:
            clock_log.close()
    if abort:
        print(abort, file=sys.stderr)
    if clock_log is not None:
        header["clocks"] = _clocks(rows, ceiling_windows, clock_log)

    doc = document(rows, abort)
    for problem in validate(doc):  # a bug here, not in the kernels: say so loudly
        print(f"result schema: {problem}", file=sys.stderr)
    print(render_markdown(doc))
    if paths:
        write_files(doc, *paths)
        print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    if abort == "interrupted":
        return 130
    return 1 if abort else 0


def _clocks(rows: list[dict], ceiling_windows: dict, clock_log) -> dict:
    """The header's `clocks` (and each row's, in place); a failure here is a note, never
    a lost table."""
    from moekit.bench.clocks import annotate

    try:
        peaks = annotate(rows, ceiling_windows, clock_log.samples)
    except Exception as exc:  # the rows are the run's result: keep them whatever this does
        return {"note": f"clock annotation failed: {exc!r}"}
    return {"sampler": "nvidia-smi clocks.sm and power.draw every 100 ms; each row's "
                       "sm_clock_mhz / power_w are the medians inside its window_s",
            "ceilings": peaks, "note": clock_log.error}


def _smi_id(props, device) -> str:
    """nvidia-smi's name for the device: its UUID, which CUDA_VISIBLE_DEVICES leaves
    alone (the CUDA index and nvidia-smi's differ when it is set); the index if the
    properties have no UUID."""
    uuid = str(getattr(props, "uuid", "") or "").removeprefix("GPU-")
    return f"GPU-{uuid}" if uuid else str(device.index)


def _interrupt(signum, frame):
    """SIGTERM (a time limit) ends the run like Ctrl-C: the rows so far are written."""
    raise KeyboardInterrupt


def _notes(args: argparse.Namespace, presets: list, cuda: bool) -> list[str]:
    """Human-readable lines for the Markdown header."""
    routing = ("softmax over N(0, 1) logits" if args.routing == "balanced" else
               "softmax over N(0, 1) logits plus per-expert offsets −2·log(1 + rank)")
    notes = [
        f"weights {args.dtype}; routing {args.routing}: {routing} (seed {args.seed}), "
        "top-k renormalised",
        "floor = max(bytes ÷ memory GB/s, flops ÷ matmul peak); bytes = experts hit × expert "
        "weights (+ biases) + hidden read once + out written once",
        f"rel_err = ‖out − ref‖₂ ÷ ‖ref‖₂ against moekit.reference.fused_experts in float32 "
        f"(on {args.ref_rows} random tokens when M > {args.ref_rows})",
    ]
    if is_fp8(args.dtype):
        notes[1:] = [
            f"fp8: bf16 weights quantised once per preset by QuantScheme.{args.dtype}, bf16 "
            "tokens; bytes count fp8 weights + float32 scales, the peak is fp8 "
            "(torch._scaled_mm); baselines left out (no fp8 path)",
            "floor = max(bytes ÷ memory GB/s, flops ÷ fp8 matmul peak); bytes = experts hit × "
            "expert weights and scales (+ bf16 biases) + hidden read once + out written once",
            f"rel_err against moekit.reference.fused_experts_quantized on the same fp8 weights "
            f"(the kernels' error); rel_err_bf16 against moekit.reference.fused_experts on "
            f"the bf16 weights (the format's error); float32, on {args.ref_rows} random "
            f"tokens when M > {args.ref_rows}",
        ]
    if cuda:
        flush = ("L2 emptied before each call by a 256 MB read (clean lines)"
                 if args.l2_flush == "read" else "L2 emptied before each call by do_bench's "
                 "256 MB memset (dirty lines, written back during the call)")
        notes.append(f"timing: median of samples on do_bench's schedule, {flush}; CUDA-graph "
                     f"replay also for M ≤ {args.graph_max_m}" if args.graph else
                     f"timing: median of samples on do_bench's schedule, {flush}; no graph replay")
    else:
        notes.append("CPU shapes are scaled down (E ≤ 16, H and I ≈ 1/32); moekit runs its "
                     "reference here")
    if any(p.name == "gpt-oss-120b" for p in presets):
        notes.append("gpt-oss-120b runs swigluoai with biases b13/b2 here; PERF.md's vLLM "
                     "numbers to beat used silu without biases (preset gpt-oss-120b-silu)")
    return notes
