"""A/B of whole source trees on `tree_timing.py`'s cells, with SM clocks sampled beside.

Each version runs `tree_timing.py` in its own process per round (PYTHONPATH = its src,
plus any environment it names), the order rotating by round; `nvidia-smi` samples SM
clock, power and throttle reasons every 100 ms for the whole run, and each cell gets the
median clock and power inside its timing window, so a slower cell can be told apart from
a cell that ran at lower clocks. Writes <out>/<tag>.json and .md.

    python3 bench/scripts/tree_ab.py --tag v5-vs-main --out /tmp/o --rounds 2 \
        --versions v5=/tmp/v5/src main=src main-gluon0=src,MOEKIT_GLUON=0 \
        -- --presets deepseek-v3 mixtral-8x7b --tokens 4096 16384
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLOCK_QUERY = "timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active"


def _parse_version(spec: str) -> tuple[str, str, dict]:
    """label=src[,VAR=value...]; a comma-separated part without '=' continues the value
    before it, so a value may hold commas (`MOEKIT_GEMM1_PERSISTENT=2,flat`)."""
    label, rest = spec.split("=", 1)
    src, *parts = rest.split(",")
    env: dict[str, str] = {}
    name = None
    for part in parts:
        if "=" in part:
            name, value = part.split("=", 1)
            env[name] = value
        elif name is None:
            raise ValueError(f"version {spec!r}: {part!r} names no VAR=value")
        else:
            env[name] += "," + part
    return label, src, env


def _samples(path: str) -> list[tuple[float, float, float, str]]:
    """(unix time, SM MHz, watts, throttle reasons) per nvidia-smi line."""
    rows = []
    for line in open(path):
        parts = [p.strip() for p in line.split(",")]
        try:
            stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            rows.append((stamp, float(parts[1].split()[0]), float(parts[2].split()[0]),
                         parts[3]))
        except (ValueError, IndexError):
            continue
    return rows


def _in_window(samples, window):
    inside = [s for s in samples if window[0] <= s[0] <= window[1]]
    if not inside:
        return None, None, None
    reasons = sorted({s[3] for s in inside})
    return (statistics.median(s[1] for s in inside), statistics.median(s[2] for s in inside),
            "/".join(reasons))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tag", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--versions", nargs="+", required=True,
                        help="label=src[,VAR=value...] (a value may hold commas: VAR=2,flat); "
                             "the first is the ratios' base")
    parser.add_argument("timing_args", nargs=argparse.REMAINDER,
                        help="after --: arguments for tree_timing.py")
    args = parser.parse_args()
    versions = [_parse_version(v) for v in args.versions]
    timing_args = [a for a in args.timing_args if a != "--"]
    os.makedirs(args.out, exist_ok=True)
    clock_log = os.path.join(args.out, f"{args.tag}-clocks.csv")
    sampler = subprocess.Popen(["nvidia-smi", f"--query-gpu={CLOCK_QUERY}",
                                "--format=csv,noheader", "--loop-ms=100"],
                               stdout=open(clock_log, "w"), stderr=subprocess.DEVNULL)
    runs = []  # (label, round, cells)
    stack = "?"
    try:
        for rnd in range(args.rounds):
            for j in range(len(versions)):
                label, src, env = versions[(j + rnd) % len(versions)]
                path = os.path.join(args.out, f"{args.tag}-{label}-r{rnd + 1}.json")
                start = time.time()
                proc = subprocess.run(
                    [sys.executable, os.path.join(HERE, "tree_timing.py"), "--out", path,
                     *timing_args], env={**os.environ, "PYTHONPATH": src, **env},
                    capture_output=True, text=True)
                print(f"== {label} round {rnd + 1}: rc={proc.returncode} "
                      f"({time.time() - start:.0f} s)", flush=True)
                if proc.returncode:
                    print(proc.stderr[-2000:])
                    continue
                doc = json.load(open(path))
                runs.append((label, rnd + 1, doc["cells"]))
                stack = f"{doc['device']}; torch {doc['torch']}, triton {doc.get('triton', '?')}"
    finally:
        sampler.terminate()
    samples = _samples(clock_log)
    table = {}
    for label, rnd, cells in runs:
        for cell in cells:
            mhz, watts, reasons = _in_window(samples, cell["window_s"])
            table.setdefault((cell["preset"], cell["tokens"]), {}).setdefault(label, []).append(
                {"round": rnd, "ms": cell["median_ms"], "tflops": cell["tflops"],
                 "sm_mhz": mhz, "watts": watts, "throttle": reasons,
                 "rel_err_first64": cell.get("rel_err_first64")})
    base = versions[0][0]
    lines = [f"# tree A/B `{args.tag}` — {datetime.date.today()}", "",
             f"- device: {stack}",
             f"- command: `python3 bench/scripts/tree_ab.py {' '.join(sys.argv[1:])}`",
             f"- versions: {', '.join(args.versions)}; rounds {args.rounds}, order rotating",
             "- cell: median ms of the rounds' medians; ratio = base time ÷ this time (above 1:"
             " faster than the base); MHz / W: median SM clock and power sampled inside the"
             " cell's timing windows", "",
             "| cell | " + " | ".join(v[0] for v in versions) + " |",
             "|---|" + "---|" * len(versions)]
    for (preset, tokens), by_label in table.items():
        name = preset if not tokens else f"{preset} M={tokens}"
        row = []
        base_ms = (statistics.median(r["ms"] for r in by_label[base]) if base in by_label
                   else None)
        for label, _, _ in versions:
            rs = by_label.get(label)
            if not rs:
                row.append("—")
                continue
            ms = statistics.median(r["ms"] for r in rs)
            mhz = [r["sm_mhz"] for r in rs if r["sm_mhz"]]
            watts = [r["watts"] for r in rs if r["watts"]]
            ratio = f" ({base_ms / ms:.3f}×)" if base_ms and label != base else ""
            clock = (f", {statistics.median(mhz):.0f} MHz / {statistics.median(watts):.0f} W"
                     if mhz else "")
            tflops = statistics.median(r["tflops"] for r in rs)
            row.append(f"{ms:.3f} ms, {tflops:.0f} TF{ratio}{clock}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump({"versions": args.versions, "timing_args": timing_args,
                   "cells": [{"preset": p, "tokens": t, "runs": v} for (p, t), v in table.items()]},
                  f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
