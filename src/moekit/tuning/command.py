"""`moekit tune`: search tile configurations on this GPU and write its tuned table.

    moekit tune [--presets NAME ...] [--tokens M ...] [--dtype DTYPE] [--margin 0.05]
                [--out PATH] [--fresh]
    moekit tune --report PATH

Times CUDA-graph replays of `fused_experts` (or `fused_experts_fp8` for an fp8 scheme)
per candidate (inputs as in `moekit bench`; fp8 configurations that differ only in the
tiles of a GEMM run as a Gluon kernel, whose tiles are fixed, are timed once, so they
tie rather than win on noise), prints one line per cell, saves after every
cell and resumes an interrupted run (use `--fresh` to start over). The default output is
the table the op reads on this device,
`src/moekit/tuning/tables/<device-slug>-fused_experts-<dtype>.json`. At the end, and with
`--report` for any table (no GPU needed), it lists the cells where the heuristic is over
10% slower than the best configuration found.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys

from moekit.bench.presets import PRESETS, TOKEN_COUNTS, get_preset
from moekit.quant.scheme import PRESET_NAMES
from moekit.tuning.config import ExpertsConfig, GemmConfig

DTYPES = ("bf16", "fp16", *PRESET_NAMES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), metavar="NAME")
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKEN_COUNTS), metavar="M")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--margin", type=float, default=0.05,
                        help="keep a tuned entry only if it beats the heuristic by this fraction")
    parser.add_argument("--out", default=None, help="table path (default: the shipped table)")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing table")
    parser.add_argument("--report", metavar="PATH", default=None,
                        help="summarise an existing table (cells, cliffs) and exit")


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.tuning.tuner import report

    if args.report is not None:
        from moekit.tuning.tables import load_table

        table = load_table(args.report)
        if table is None:
            print(f"moekit tune: no table at {args.report}", file=sys.stderr)
            return 2
        print("\n".join(report(table)))
        return 0
    if not torch.cuda.is_available():
        print("moekit tune: needs a CUDA device (it times kernels); none found", file=sys.stderr)
        return 2
    try:
        presets = [get_preset(name) for name in args.presets]
    except KeyError as exc:
        print(f"moekit tune: {exc.args[0]}", file=sys.stderr)
        return 2
    if any(m < 1 for m in args.tokens):
        print("moekit tune: --tokens must be positive", file=sys.stderr)
        return 2

    import triton

    from moekit.device import device_slug
    from moekit.tuning.tables import load_table, table_path
    from moekit.tuning.tuner import new_table, tune

    name = torch.cuda.get_device_name()
    path = args.out or table_path(device_slug(name), args.dtype)
    table = None if args.fresh else load_table(path)
    if table is None:
        command = "moekit tune " + shlex.join(sys.argv[2:])
        table = new_table(name, args.dtype, command,
                          {"torch": torch.__version__, "triton": triton.__version__})
    else:
        print(f"resuming {path}: {len(table['entries'])} cells done", file=sys.stderr)
    progress = lambda line: print(line, file=sys.stderr, flush=True)
    if args.dtype.startswith("fp8"):
        tune(table, path, presets, args.tokens, _graph_measure(args.dtype),
             margin=args.margin, heuristic_for=_fp8_heuristic(args.dtype),
             start_at=_fp8_tiles_at(args.dtype), progress=progress)
    else:
        tune(table, path, presets, args.tokens, _graph_measure(args.dtype), margin=args.margin,
             progress=progress)
    used = sum(e["use"] for e in table["entries"])
    print(f"wrote {path}: {len(table['entries'])} cells, {used} beat the heuristic by "
          f"{args.margin:.0%} or more")
    print("\n".join(report(table)))
    return 0


def _fp8_heuristic(scheme: str):
    """`fused_experts_fp8`'s default configuration for (preset, M)."""
    from moekit.experts_fp8 import default_fp8_config
    from moekit.tuning.tuner import this_gpu_sms

    sms = this_gpu_sms()
    return lambda preset, m: default_fp8_config(m, preset.num_experts, preset.top_k,
                                                preset.hidden, preset.inter, scheme, sms)


def _fp8_tiles_at(scheme: str):
    """Where the fp8 search starts at another row tile: the heuristic's own GEMM tiles, or
    the direct path's (`direct_fp8_config`) at block_m 1."""
    from moekit.experts_fp8 import direct_fp8_config
    from moekit.tuning.config import DIRECT_BLOCK_M
    from moekit.tuning.tuner import same_tiles_at

    def start_at(heuristic, block_m):
        if block_m == DIRECT_BLOCK_M:
            return direct_fp8_config(1, 1, 0, 0, scheme)
        return same_tiles_at(heuristic, block_m)
    return start_at


def _graph_measure(dtype: str):
    """µs of one CUDA-graph replay of the op for (preset, M, config): `fused_experts`, or
    `fused_experts_fp8` for an fp8 scheme; inf for a configuration that cannot run (one the
    scheme rules out, or that exceeds shared memory or registers)."""
    import torch
    from triton.runtime.errors import OutOfResources  # not a RuntimeError

    import moekit
    from moekit._gluon_gemm1_16bit import use_gluon_gemm1_16bit
    from moekit._gluon_gemm2_16bit import use_gluon_gemm2_16bit
    from moekit._tma import use_tma
    from moekit.activation import Activation
    from moekit.bench.fp8 import quantize_experts
    from moekit.bench.inputs import make_tokens, make_weights
    from moekit.bench.timing import CaptureFailed, CudaTimer
    from moekit.experts_fp8 import _check_config, gluon_gemms
    from moekit.quant import QuantScheme

    scheme = QuantScheme.parse(dtype) if dtype.startswith("fp8") else None
    torch_dtype = {"fp16": torch.float16}.get(dtype, torch.bfloat16)
    timer = CudaTimer(warmup_ms=5, rep_ms=40)
    cache: dict = {}
    timed: dict = {}  # (preset, M, the configuration as it runs) → µs

    def weights_for(preset):
        weights = make_weights(preset, torch_dtype, "cuda")
        return weights if scheme is None else quantize_experts(weights, dtype)

    def measure(preset, m, config) -> float:
        if cache.get("preset") is not preset:
            cache.clear()
            torch.cuda.empty_cache()
            cache.update(preset=preset, weights=weights_for(preset))
        if cache.get("m") != m:
            cache.update(m=m, tokens=make_tokens(preset, m, torch_dtype, torch.device("cuda")))
        w, (hidden, topk) = cache["weights"], cache["tokens"]
        # Gluon GEMMs ignore their tiles: time each set of kernels as it runs once.
        gluon = (False, False)
        if scheme is not None:
            try:
                _check_config(config, scheme)
            except ValueError:  # the scheme rules the configuration out
                return math.inf
            if not config.direct:
                gluon = gluon_gemms(hidden, w.w13, w.w2, scheme, preset.activation,
                                    config.block_m, w.b13)
        elif use_tma(hidden, w.w13, w.w2, config.block_m):
            gluon = (use_gluon_gemm1_16bit(hidden, w.w13, config.block_m,
                                           Activation.parse(preset.activation).kind),
                     use_gluon_gemm2_16bit(w.w2, config.block_m, topk.ids.numel()))
        key = (preset.name, m, config_as_run(config, gluon))
        if key in timed:
            return timed[key]
        op = moekit.fused_experts if scheme is None else moekit.fused_experts_fp8
        options = {} if scheme is None else {"scheme": scheme}

        def call():
            return op(hidden, w.w13, w.w2, topk.ids, topk.weights, activation=preset.activation,
                      b13=w.b13, b2=w.b2, config=config, **options)
        try:
            timing, _ = timer.graph(call, check=lambda out: 0.0)
        except ValueError:  # the scheme rules the configuration out, before any launch
            return math.inf
        except (CaptureFailed, RuntimeError, OutOfResources) as exc:  # shared memory, registers
            print(f"  {config}: {type(exc).__name__}", file=sys.stderr)
            return math.inf
        timed[key] = timing.median_us
        return timing.median_us

    return measure


# Stands in for the tiles of a GEMM that runs as a Gluon kernel (its tiles are fixed).
_GLUON_TILES = GemmConfig(128, 128, 8, 8, 3)


def config_as_run(config: ExpertsConfig, gluon: tuple[bool, bool]) -> ExpertsConfig:
    """`config` with the tiles of each GEMM that runs as a Gluon kernel (`gluon`: GEMM1's
    and GEMM2's answer of `moekit.experts_fp8.gluon_gemms`, or for 16-bit weights
    `use_gluon_gemm1_16bit`'s and `use_gluon_gemm2_16bit`'s) replaced by one placeholder, so that
    configurations which run the same kernels compare equal."""
    gluon1, gluon2 = gluon
    return dataclasses.replace(config, gemm1=_GLUON_TILES if gluon1 else config.gemm1,
                               gemm2=_GLUON_TILES if gluon2 else config.gemm2)
