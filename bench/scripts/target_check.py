"""Which cells of `moekit bench` tables miss the performance issues' targets.

Issue 3 (bf16/fp16): decode (M ≤ 64, graph replay) ≥ 85% of the roofline; prefill
(M ≥ 4096) ≥ 70% of the matmul peak on presets with I ≥ 768; every M ≥ 60% of the
roofline. Issue 5 (fp8): decode ≥ 85% of the roofline with fp8 bytes; prefill ≥ 55% of
the fp8 peak. Prefill is judged two ways, since the issues say "of the matmul peak" but
a prefill cell whose floor is its bytes cannot reach that share of the peak at all:
flops ÷ time ÷ peak (as written) and the roofline % (floor ÷ time; both equal where
compute bounds the cell). Graph-replay cells only, as the tables' headline.

With `--launch-floor` (a `decode_floor_experiment.py` file), the decode misses are split by
what a perfect layer could reach: a read of exactly the cell's bytes still pays a graph
replay's fixed cost and each launch's ramp and drain, so a cell whose floor is a few µs
cannot reach 85% in one launch, or in the two a GEMM2 waiting on its GEMM1 needs.

    python bench/scripts/target_check.py bench/results/h100-sxm-20261205-kernels-*-s42.json \
        --out bench/results/h100-sxm-20261205-targets-s42.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

from moekit.bench.results import peak_clocks

DECODE_M, PREFILL_M = 64, 4096
DECODE_PCT, NO_CLIFF_PCT = 85.0, 60.0
PREFILL_PCT = {"16bit": 70.0, "fp8": 55.0}
PREFILL_MIN_I = {"16bit": 768, "fp8": 0}


def _family(dtype: str) -> str:
    return "fp8" if dtype.startswith("fp8") else "16bit"


def misses(doc: dict) -> dict[str, list[str]]:
    """Target name → the cells that miss it, as 'preset M=… value'; a prefill miss also
    names its SM clock where the table sampled it (a long prefill cell can run well
    under the clock its peak was measured at: `clock_line`)."""
    ceilings = doc["ceilings"]
    out: dict[str, list[str]] = {"decode": [], "prefill (of peak)": [],
                                 "prefill (roofline)": [], "no cliff": []}
    for row in doc["rows"]:
        if row["impl"] != "moekit" or not row["graph"]:
            continue
        family = _family(row["dtype"])
        peak = ceilings["fp8_TFLOPs" if family == "fp8" else f"{row['dtype']}_TFLOPs"]
        cell = f"{row['preset']} M={row['M']}"
        pct = row["roofline_pct"]
        if row["M"] <= DECODE_M and pct < DECODE_PCT:
            out["decode"].append(f"{cell} {pct:.0f}%")
        if row["M"] >= PREFILL_M and row["I"] >= PREFILL_MIN_I[family]:
            of_peak = 100.0 * row["TFLOPs"] / peak
            if of_peak < PREFILL_PCT[family]:
                clock = f", {row['sm_clock_mhz']:,} MHz" if row.get("sm_clock_mhz") else ""
                out["prefill (of peak)"].append(
                    f"{cell} {of_peak:.0f}% ({row['bound']}-bound{clock})")
            if pct < PREFILL_PCT[family]:
                out["prefill (roofline)"].append(f"{cell} {pct:.0f}%")
        if family == "16bit" and pct < NO_CLIFF_PCT:
            out["no cliff"].append(f"{cell} {pct:.0f}%")
    return out


def launch_costs(doc: dict, mem_gbps: float | None = None) -> tuple[float, float]:
    """(one, two): the median µs over its bytes' floor that a perfect read of a decode
    layer's weights paid in one launch and in two (`decode_floor_experiment.py`'s
    `read_all` and `read_two`, graph replay). The floor is the bytes over the row's own
    `mem_GBps` (the run's bandwidth), else over `mem_gbps` (a table's run beside it)."""
    one, two = [], []
    for row in doc["rows"]:
        mem = row.get("mem_GBps") or mem_gbps
        if not mem:
            raise ValueError(f"{row['preset']} M={row['M']}: the row has no mem_GBps; give "
                             "the bandwidth of a table run beside it (--mem-gbps)")
        floor_us = (row["w13_MB"] + row["w2_MB"]) * 1e3 / mem
        one.append(row["read_all_us"] - floor_us)
        two.append(row["read_two_us"] - floor_us)
    return statistics.median(one), statistics.median(two)


def out_of_reach(doc: dict, costs: tuple[float, float]) -> dict[str, list[str]]:
    """The decode misses no layer can bring to the line, by `launch_costs`: at a floor of f
    µs a perfect layer of one launch takes f + one, of two f + two. Two is the least for
    a GEMM2 that needs its tokens' whole GEMM1 rows (one launch waiting inside on its own
    programs measured slower still: session 26). Cells are keyed by the fewest launches
    that still miss: "one launch" misses in any form, "two launches" only in two."""
    one, two = costs
    out: dict[str, list[str]] = {"one launch": [], "two launches": []}
    for row in doc["rows"]:
        if (row["impl"] != "moekit" or not row["graph"] or row["M"] > DECODE_M
                or row["roofline_pct"] >= DECODE_PCT):
            continue
        floor = row["floor_us"]
        best_one, best_two = (100.0 * floor / (floor + c) for c in (one, two))
        cell = (f"{row['preset']} M={row['M']} {row['roofline_pct']:.0f}% "
                f"(at most {math.floor(best_one)}% / {math.floor(best_two)}%)")
        if best_one < DECODE_PCT:
            out["one launch"].append(cell)
        elif best_two < DECODE_PCT:
            out["two launches"].append(cell)
    return out


def reach_lines(doc: dict, costs: tuple[float, float], source: str) -> list[str]:
    """The report's lines for `out_of_reach`."""
    reach = out_of_reach(doc, costs)
    head = (f"a perfect read of a cell's bytes pays {costs[0]:.1f} µs over its floor in one "
            f"launch, {costs[1]:.1f} in two ({source}); at most one / two launches' %")
    return [f"- **decode out of reach** — {head}:",
            f"  - in one launch or two: {len(reach['one launch'])} cells — "
            + ("; ".join(reach["one launch"]) or "none"),
            f"  - in two launches (one would need no wait between the GEMMs): "
            f"{len(reach['two launches'])} cells — "
            + ("; ".join(reach["two launches"]) or "none")]


def clock_line(doc: dict) -> str | None:
    """The SM clocks the table's peaks and its prefill / decode graph cells ran at, where
    `moekit bench` sampled them: a peak measured at a lower clock than the cells (on an
    H200 in session 43 the fp8 8192³ product ran at 1,410–1,530 MHz, the layer's cells at
    1,980) makes "of the peak" read high."""
    parts = [f"{name} peak {mhz:,} MHz" + (f" ({watts} W)" if watts is not None else "")
             for name, mhz, watts in peak_clocks(doc)]
    rows = [r for r in doc["rows"] if r["impl"] == "moekit" and r["graph"]
            and r.get("sm_clock_mhz")]
    for label, cells in (("prefill", [r for r in rows if r["M"] >= PREFILL_M]),
                         ("decode", [r for r in rows if r["M"] <= DECODE_M])):
        if cells:
            mhz = sorted(r["sm_clock_mhz"] for r in cells)[len(cells) // 2]
            parts.append(f"{label} cells median {mhz:,} MHz")
    return "- SM clocks: " + "; ".join(parts) if parts else None


def report(paths: list[str], costs: tuple[float, float] | None = None,
           source: str = "", command: str | None = None) -> str:
    lines = ["# Cells under the issues' targets", ""]
    if command:
        lines.append(f"- command: `{command}` (arithmetic on the files named, "
                     f"{datetime.date.today().isoformat()})")
    lines += [f"- decode: M ≤ {DECODE_M}, roofline ≥ {DECODE_PCT:.0f}%; prefill: M ≥ {PREFILL_M}, "
              "≥ 70% (16-bit, I ≥ 768) / 55% (fp8) of the same run's matmul peak, and the "
              f"roofline % beside it; no cliff (16-bit): every M ≥ {NO_CLIFF_PCT:.0f}% of the "
              "roofline; graph replay", ""]
    for path in paths:
        doc = json.loads(Path(path).read_text())
        dtypes = sorted({r["dtype"] for r in doc["rows"] if r["impl"] == "moekit"})
        lines += [f"## {Path(path).name} ({', '.join(dtypes)}; {doc['device']}, "
                  f"git {doc.get('git_commit')}, {doc['date']})", ""]
        clocks = clock_line(doc)
        if clocks:
            lines.append(clocks)
        for target, cells in misses(doc).items():
            if target == "no cliff" and not any(_family(d) == "16bit" for d in dtypes):
                continue
            lines.append(f"- **{target}**: {len(cells)} cells under — "
                         + ("; ".join(cells) if cells else "none"))
            if target == "decode" and costs is not None:
                lines += reach_lines(doc, costs, source)
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", help="`moekit bench` JSON files")
    parser.add_argument("--out", help="write the Markdown here too")
    parser.add_argument("--launch-floor", metavar="JSON",
                        help="a decode_floor_experiment.py file: split the decode misses by "
                             "what one or two perfect launches could reach")
    parser.add_argument("--mem-gbps", type=float,
                        help="with --launch-floor, for rows without their run's bandwidth")
    args = parser.parse_args(argv)
    costs, source = None, ""
    if args.launch_floor:
        floor_doc = json.loads(Path(args.launch_floor).read_text())
        costs = launch_costs(floor_doc, args.mem_gbps)
        source = f"{floor_doc['device']}, `{Path(args.launch_floor).name}`"
    command = " ".join(["bench/scripts/target_check.py", *(argv or sys.argv[1:])])
    text = report(args.tables, costs, source, command)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
