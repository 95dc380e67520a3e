"""Two or more code versions' `moekit bench` tables side by side: per cell, each version's
median over its rounds, and the ratio baseline ÷ version (> 1: the version is faster).

For A/B runs of whole source trees (`ab_bench.sh` runs them, alternating versions by
round so that drift hits both): every version's JSON files of one round ran back to back
on the same GPU. Cells are keyed by (dtype, preset, M, graph or eager); only cells that
every version timed are compared. Each version's largest rel_err over its rounds is kept
beside its time, so a change that moves accuracy shows. The device, versions and date
come from the first input file; the command is this script's.

    python3 bench/scripts/compare_tables.py --out DIR --stem NAME \
        main=a-r1.json,a-r2.json candidate=b-r1.json,b-r2.json [--eager]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

from moekit.bench.experiment_files import write_experiment  # noqa: E402


def load_version(spec: str) -> tuple[str, list[dict]]:
    """"label=file1.json,file2.json" → (label, the files' documents)."""
    label, _, files = spec.partition("=")
    if not label or not files:
        raise SystemExit(f"version {spec!r}: expected LABEL=FILE[,FILE…]")
    docs = []
    for path in files.split(","):
        with open(path) as f:
            docs.append(json.load(f))
    return label, docs


def cells(docs: list[dict], graph: bool) -> dict[tuple, dict]:
    """moekit rows of one version's rounds → {(dtype, preset, M): {"us": [...], "err": max,
    "roofline": [...]}} for graph replay (or eager) rows."""
    out: dict[tuple, dict] = {}
    for doc in docs:
        for row in doc["rows"]:
            if row.get("impl") != "moekit" or bool(row.get("graph")) != graph:
                continue
            if row.get("time_us") is None:
                continue
            cell = out.setdefault((row["dtype"], row["preset"], row["M"]),
                                  {"us": [], "err": 0.0, "roofline": [], "mhz": []})
            cell["us"].append(row["time_us"])
            if row.get("sm_clock_mhz"):  # tables since 2026-12-05 (`moekit.bench.clocks`)
                cell["mhz"].append(row["sm_clock_mhz"])
            cell["roofline"].append(row.get("roofline_pct") or 0.0)
            cell["err"] = max(cell["err"], row.get("rel_err") or 0.0)
    return out


def compare(versions: list[tuple[str, list[dict]]], graph: bool) -> list[dict]:
    """One row per cell every version timed: medians, rounds, errors, ratios to the first."""
    tables = [(label, cells(docs, graph)) for label, docs in versions]
    common = set.intersection(*(set(t) for _, t in tables))
    rows = []
    for key in sorted(common, key=lambda k: (k[0], k[1], k[2])):
        dtype, preset, m = key
        row = {"dtype": dtype, "preset": preset, "M": m, "graph": graph}
        base = statistics.median(tables[0][1][key]["us"])
        for label, table in tables:
            cell = table[key]
            median = statistics.median(cell["us"])
            row[f"{label}_us"] = round(median, 2)
            row[f"{label}_rounds"] = cell["us"]
            row[f"{label}_rel_err"] = cell["err"]
            row[f"{label}_roofline_pct"] = round(statistics.median(cell["roofline"]), 1)
            row[f"{label}_ratio"] = round(base / median, 3)
            if cell["mhz"]:
                row[f"{label}_sm_clock_mhz"] = round(statistics.median(cell["mhz"]))
        rows.append(row)
    return rows


def _clock_notes(rows: list[dict], labels: list[str]) -> list[str]:
    """Each version's median SM clock over the compared cells, where its tables recorded
    clocks: a ratio between versions that ran at different clocks is partly the clock."""
    clocks = {lab: [r[f"{lab}_sm_clock_mhz"] for r in rows if f"{lab}_sm_clock_mhz" in r]
              for lab in labels}
    shown = [f"{lab} {statistics.median(v):,.0f}" for lab, v in clocks.items() if v]
    return [f"- median SM clock of the cells, MHz: {', '.join(shown)}"] if shown else []


def markdown(rows: list[dict], labels: list[str]) -> list[str]:
    head = ["dtype", "preset", "M", *(f"{lab} µs (roofline)" for lab in labels),
            *(f"{labels[0]} ÷ {lab}" for lab in labels[1:]), "rel_err (max)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        times = [f"{r[f'{lab}_us']:,} ({r[f'{lab}_roofline_pct']}%)" for lab in labels]
        ratios = [f"{r[f'{lab}_ratio']:.3f}" for lab in labels[1:]]
        errs = " / ".join(f"{r[f'{lab}_rel_err']:.1e}" for lab in labels)
        lines.append("| " + " | ".join([r["dtype"], r["preset"], str(r["M"]), *times, *ratios,
                                        errs]) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="+", metavar="LABEL=FILE[,FILE…]",
                        help="the first is the baseline")
    parser.add_argument("--out", default=".")
    parser.add_argument("--stem", default="ab-tables")
    parser.add_argument("--eager", action="store_true", help="eager rows, not graph replay")
    args = parser.parse_args(argv)
    if len(args.versions) < 2:
        raise SystemExit("give at least two versions")
    versions = [load_version(spec) for spec in args.versions]
    labels = [label for label, _ in versions]
    rows = compare(versions, graph=not args.eager)
    if not rows:
        raise SystemExit("no cell was timed by every version")
    first = versions[0][1][0]
    meta = {"device": first["device"], "torch": first["torch"], "triton": first["triton"],
            "date": first["date"], "command": " ".join(sys.argv),
            "code": ", ".join(f"{label} {docs[0].get('git_commit', '?')}"
                              for label, docs in versions),
            "bench_commands": {label: [d["command"] for d in docs] for label, docs in versions}}
    ratios = {lab: [r[f"{lab}_ratio"] for r in rows] for lab in labels[1:]}
    notes = [f"- {'graph replay' if not args.eager else 'eager'} µs, median of each "
             f"version's rounds ({', '.join(f'{lab}: {len(d)}' for lab, d in versions)}); "
             f"ratio = {labels[0]} ÷ version, > 1 faster; roofline % as the table reports it",
             *(f"- {lab}: ratio {min(v):.3f}–{max(v):.3f}, median {statistics.median(v):.3f} "
               f"over {len(v)} cells" for lab, v in ratios.items()),
             *_clock_notes(rows, labels)]
    write_experiment(args.out, args.stem, meta, rows, f"A/B of moekit bench tables: "
                     f"{' against '.join(labels)}", notes, markdown(rows, labels))
    print("\n".join(notes + [""] + markdown(rows, labels)))


if __name__ == "__main__":
    main()
