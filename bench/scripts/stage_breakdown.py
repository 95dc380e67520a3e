"""Where the time of one `fused_experts` call goes: plan, GEMM1, GEMM2, combine, and the gaps.

Each stage is captured alone in a CUDA graph and timed by replay (L2 flushed between
replays), next to the whole call captured the same way. The stages are the call's own
(`call_stages`: its config, tuned tables included, its plan with tail tiles, the Gluon or
Triton GEMMs, or the direct path's two launches). Each stage alone carries the replay's
fixed floor (~5 µs), so the sum over-counts and the gaps line (whole − stages) can be
negative; a stage's own time is roughly its figure less that floor. For the GEMMs the
weight bytes actually read (experts hit) give an achieved bandwidth, the figure decode
cares about. `--tiles` also times GEMM1 and GEMM2 with other column tiles, to see whether
a cell is short of programs.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/stage_breakdown.py --out $OUT
Writes stage-breakdown.json under --out (each row with the median SM clock and power
nvidia-smi sampled during its replays) and prints one line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton

import moekit._replay
from moekit._gluon_gemm2_16bit import gluon_gemm2_16bit, use_gluon_gemm2_16bit
from moekit._tma import persistent_programs
from moekit.bench.clocks import ClockLog, summarize
from moekit.bench.inputs import experts_hit, make_tokens, make_weights
from moekit.bench.presets import get_preset
from moekit.bench.timing import graph_replay_us
from moekit.dispatch import dispatch_plan
from moekit.experts import (
    _select_config,
    fused_experts,
    launch_combine,
    launch_gemm1,
    launch_gemm2,
    use_tma,
)
from moekit.experts_direct import gemm2_arrivals, launch_direct_gemm1, launch_direct_gemm2
from moekit.tuning.config import DIRECT_BLOCK_M

moekit._replay.enabled = False  # the call's own launches, not an eager call's replay

CELLS = ["qwen3-30b-a3b:1", "qwen3-30b-a3b:8", "qwen3-30b-a3b:64", "qwen3-30b-a3b:1024",
         "granite-3.0-3b-a800m:1", "granite-3.0-3b-a800m:8", "granite-3.0-3b-a800m:64",
         "granite-3.0-3b-a800m:512", "olmoe-1b-7b:1", "olmoe-1b-7b:8",
         "deepseek-v2-lite:1", "deepseek-v2-lite:8", "gpt-oss-120b:1", "mixtral-8x7b:1024"]


def call_stages(hidden, w, ids, weights, act, cfg, out) -> dict:
    """The call's launches as `moekit.experts._launch_fused_experts` makes them (the same
    config, plan with tail tiles, Gluon or Triton GEMMs, direct path), by stage name: each a
    thunk that reruns its stage alone on the previous stage's output, computed once here.
    The direct GEMM2 replayed alone finds its arrival counters already counted (GEMM1 zeroes
    them), so no program sums a token's parts: a little less work than in the call."""
    ints = cfg.as_ints()
    block_m, tail_m = ints[0], ints[11]
    g1, g2 = ints[1:6], ints[6:11]
    w13, w2, b13, b2 = w.w13, w.w2, w.b13, w.b2
    if block_m == DIRECT_BLOCK_M:
        arrivals = gemm2_arrivals(ids, w2.shape[1], g2)
        gemm1 = lambda: launch_direct_gemm1(hidden, w13, b13, ids, weights, act, 1.702,  # noqa: E731
                                            7.0, False, g1, arrivals)
        inter = gemm1()
        return {"gemm1 (direct)": gemm1,
                "gemm2 (direct, sums the slots)": lambda: launch_direct_gemm2(
                    inter, w2, b2, ids, weights, True, g2, out, arrivals)}
    num_experts = w2.shape[0]
    make_plan = lambda: dispatch_plan(ids, num_experts, tail_m or block_m,  # noqa: E731
                                      tile_m=block_m if tail_m else None, backend="triton")
    plan = make_plan()
    tma = use_tma(hidden, w13, w2, block_m)
    gemm1 = lambda: launch_gemm1(hidden, w13, b13, weights, plan, act, 1.702, 7.0,  # noqa: E731
                                 False, g1, tma)
    inter = gemm1()
    stages = {"plan": make_plan, "gemm1": gemm1}
    if tma and use_gluon_gemm2_16bit(w2, block_m, plan.num_pairs):
        programs = persistent_programs(hidden.device)
        gemm2 = lambda: gluon_gemm2_16bit(inter, w2, b2, weights, plan, programs)  # noqa: E731
        slots = plan.pair_slots
        stages["gemm2 (Gluon)"] = gemm2
    else:
        gemm2 = lambda: launch_gemm2(inter, w2, b2, weights, plan, True, g2, tma)  # noqa: E731
        slots = None
        stages["gemm2"] = gemm2
    rows = gemm2()
    stages["combine"] = lambda: launch_combine(rows, ids, num_experts, out, pair_slots=slots)
    return stages


# nvidia-smi samples every 100 ms (`moekit.bench.clocks`): a window shorter than this gets
# one sample or none (session 49: a 50 ms replay budget gave prefill stages ~60 ms).
MIN_WINDOW_S = 0.5


def timed_replay(fn) -> tuple[float, list[float]]:
    """`graph_replay_us(fn)` and the wall-clock [start, end] it ran in (for the SM clock),
    timed again with a longer budget when that window was under MIN_WINDOW_S."""
    start = time.time()
    us = graph_replay_us(fn)
    took = time.time() - start
    if took < MIN_WINDOW_S:
        start = time.time()
        us = graph_replay_us(fn, rep_ms=min(1000.0, 50 * MIN_WINDOW_S / max(took, 1e-3)))
    return us, [start, time.time()]


def run_cell(name: str, num_tokens: int, tiles: bool, log) -> list[dict]:
    preset = get_preset(name)
    dev = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, dev)
    hidden, topk = make_tokens(preset, num_tokens, torch.bfloat16, dev)
    ids, weights = topk.ids, topk.weights  # int32 and float32: no cast launch
    E, n1, H = w.w13.shape
    I = w.w2.shape[2]
    cfg = _select_config(hidden, E, ids.shape[1], I)
    hit = experts_hit(ids, E)
    elem = 2
    bytes1, bytes2 = hit * n1 * H * elem, hit * H * I * elem
    act = preset.activation
    out = torch.empty_like(hidden)
    rows = []

    def record(stage, us, window_s=None, nbytes=None):
        gbps = nbytes / us / 1e3 if nbytes else None
        rows.append({"preset": name, "M": num_tokens, "block_m": cfg.block_m,
                     "tail_m": cfg.tail_block_m, "stage": stage, "us": round(us, 2),
                     "GBps": None if gbps is None else round(gbps), "window_s": window_s})
        log(f"{name} M={num_tokens} bm={cfg.block_m}/{cfg.tail_block_m} {stage}: {us:.1f} µs"
            + ("" if gbps is None else f", {gbps:.0f} GB/s of weights"))

    total = timed_replay(lambda: fused_experts(hidden, w.w13, w.w2, ids, weights,
                                               activation=act, b13=w.b13, b2=w.b2, out=out))
    record("total", *total)
    staged = torch.empty_like(hidden)
    stages = call_stages(hidden, w, ids, weights, act, cfg, staged)
    list(stages.values())[-1]()  # the last stage writes `staged`: the call's output?
    fused_experts(hidden, w.w13, w.w2, ids, weights, activation=act, b13=w.b13, b2=w.b2,
                  out=out)
    log(f"{name} M={num_tokens}: the stages reproduce the call bitwise: "
        f"{bool(torch.equal(staged, out))}")
    parts = {stage: timed_replay(launch) for stage, launch in stages.items()}
    for stage, timed in parts.items():
        record(stage, *timed, nbytes=bytes1 if stage.startswith("gemm1") else
               bytes2 if stage.startswith("gemm2") else None)
    record("gaps (total - stages)", total[0] - sum(us for us, _ in parts.values()))
    if tiles and 1 < cfg.block_m < 128:
        plan = dispatch_plan(ids, E, cfg.block_m, backend="triton")
        inter = launch_gemm1(hidden, w.w13, w.b13, weights, plan, act, 1.702, 7.0, False,
                             cfg.as_ints()[1:6], False)
        for bn in (32, 64, 128):
            for bk in (128, 256):
                t1 = (bn, bk, 1, 4, 3 if bk == 256 else 4)
                try:
                    record(f"gemm1[{bn}x{bk} w4]",
                           *timed_replay(lambda t1=t1: launch_gemm1(
                               hidden, w.w13, w.b13, weights, plan, act, 1.702, 7.0, False,
                               t1, False)), nbytes=bytes1)
                    record(f"gemm2[{bn}x{bk} w4]",
                           *timed_replay(lambda t1=t1: launch_gemm2(
                               inter, w.w2, w.b2, weights, plan, True, t1, False)),
                           nbytes=bytes2)
                except Exception as exc:  # out of resources etc.: report and go on
                    log(f"{name} M={num_tokens} tiles {t1}: {str(exc)[:200]}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="directory of stage-breakdown.json")
    parser.add_argument("--cells", nargs="*", default=CELLS, help="preset:M pairs")
    parser.add_argument("--tiles", action="store_true", help="also time other GEMM tiles")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    uuid = str(getattr(props, "uuid", "") or "").removeprefix("GPU-")
    clocks = ClockLog(f"GPU-{uuid}" if uuid else "0")  # the SM clock each replay ran at
    rows = []
    for cell in args.cells:
        name, num_tokens = cell.rsplit(":", 1)
        try:
            rows += run_cell(name, int(num_tokens), args.tiles, lambda s: print(s, flush=True))
        except Exception as exc:  # a study: report the cell and go on
            print(f"{cell}: failed: {str(exc)[:300]}", flush=True)
        torch.cuda.empty_cache()
    clocks.close()
    for row in rows:  # the median SM clock and power inside each replay's window
        seen = summarize(clocks.samples, *row["window_s"]) if row["window_s"] else None
        row.update(seen or {})
        if seen:
            print(f"{row['preset']} M={row['M']} {row['stage']}: {seen['sm_clock_mhz']} MHz, "
                  f"{seen['power_w']} W", flush=True)
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": triton.__version__, "git": os.environ.get("MOEKIT_GIT_COMMIT", ""),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "clock_note": clocks.error}
    Path(args.out, "stage-breakdown.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
