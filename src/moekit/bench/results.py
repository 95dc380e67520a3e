"""Result files: one JSON document and a Markdown table beside it (PERF.md, "Result files").

    bench/results/<device-slug>-<yyyymmdd>-<what>.json   the record: environment,
                                                         ceilings, one row per timing
    bench/results/<device-slug>-<yyyymmdd>-<what>.md     the same, for people

The JSON keeps PERF.md's required keys (checked by `validate`) plus extra keys; the
Markdown is derived from the JSON alone, so it can be regenerated from an old run.
An existing file is never overwritten: a second run on the same day gets "-2", "-3".
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

REQUIRED_TOP_KEYS = ("device", "torch", "triton", "date", "command", "ceilings", "rows")

REQUIRED_CEILING_KEYS = ("copy_GBps", "read_GBps", "mem_GBps", "bf16_TFLOPs", "fp8_TFLOPs")
REQUIRED_ROW_KEYS = (
    "preset", "E", "topk", "H", "I", "M", "dtype", "impl", "graph", "time_us", "floor_us",
    "roofline_pct", "GBps", "TFLOPs", "rel_err",
)


def result_paths(out_dir: str | Path, slug: str, day: str, what: str) -> tuple[Path, Path]:
    """(json, md) paths for a new result, with a "-N" suffix if the stem is taken."""
    out = Path(out_dir)
    stem = f"{slug}-{day}-{what}"
    n = 1
    while True:
        name = stem if n == 1 else f"{stem}-{n}"
        json_path, md_path = out / f"{name}.json", out / f"{name}.md"
        if not json_path.exists() and not md_path.exists():
            return json_path, md_path
        n += 1


def validate(doc: dict) -> list[str]:
    """Missing PERF.md keys of a result document, as messages (empty when complete)."""
    problems = [f"missing top-level key {k!r}" for k in REQUIRED_TOP_KEYS if k not in doc]
    ceilings = doc.get("ceilings", {})
    problems += [f"missing ceilings key {k!r}" for k in REQUIRED_CEILING_KEYS
                 if k not in ceilings]
    for i, row in enumerate(doc.get("rows", [])):
        problems += [f"row {i}: missing key {k!r}" for k in REQUIRED_ROW_KEYS if k not in row]
    return problems


def write_files(doc: dict, json_path: Path, md_path: Path) -> None:
    """Write (or rewrite, for a checkpoint) the JSON record and its Markdown page."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    md_path.write_text(render_markdown(doc))


# ---------------------------------------------------------------------------- Markdown


def _fmt_us(t: float) -> str:
    return f"{t:.1f}" if t < 100 else f"{t:,.0f}"


def _fmt_rate(x: float | None, unit: str) -> str:
    """A bandwidth or peak: integers from 100 up, three significant digits below."""
    if x is None:
        return "n/a"
    return f"{x:,.0f} {unit}" if x >= 100 else f"{x:.3g} {unit}"


def _index(rows: list[dict]) -> dict[tuple, dict]:
    return {(r["preset"], r["M"], r["impl"], r["graph"]): r for r in rows}


def _grid(doc: dict, cell, graph_only: bool = False) -> list[str]:
    """A preset × M Markdown table; `cell(preset, m)` returns the text of one cell.

    With `graph_only`, the columns are the token counts that have graph rows.
    """
    presets = list(dict.fromkeys(r["preset"] for r in doc["rows"]))
    tokens = sorted({r["M"] for r in doc["rows"] if r["graph"] or not graph_only})
    lines = ["| preset | " + " | ".join(f"M={m}" for m in tokens) + " |",
             "|---|" + "---|" * len(tokens)]
    for p in presets:
        lines.append(f"| {p} | " + " | ".join(cell(p, m) for m in tokens) + " |")
    return lines


def _time_cell(row: dict | None) -> str:
    if row is None:
        return "–"
    if row["time_us"] is None:
        return "failed"
    flag = " ⚠" if row.get("rel_err_ok") is False else ""
    return f"{_fmt_us(row['time_us'])} ({row['roofline_pct']:.0f}%){flag}"


def _speedup_cell(index: dict, preset: str, m: int, impl: str) -> str:
    """Baseline time and moekit's speedup over it, like with like (graph where both have it)."""
    for graph, mark in ((True, ""), (False, "ᵉ")):
        base, ours = index.get((preset, m, impl, graph)), index.get((preset, m, "moekit", graph))
        if base is None or base["time_us"] is None:
            continue
        if ours is None or ours["time_us"] is None:
            if graph:
                continue
            return f"{_fmt_us(base['time_us'])}{mark}"
        return f"{_fmt_us(base['time_us'])}{mark} ({base['time_us'] / ours['time_us']:.2f}×)"
    row = index.get((preset, m, impl, False))
    return "failed" if row is not None else "–"


def render_markdown(doc: dict) -> str:
    """The Markdown page of a result document (headline tables, baselines, notes)."""
    rows = doc["rows"]
    index = _index(rows)
    c = doc["ceilings"]
    title = doc.get("title", "moekit kernel table")
    lines = [f"# {title} — {doc['device']}, {doc['date'][:10]}", ""]
    if doc.get("cpu"):
        lines += ["**CPU run: the reference implementation at scaled-down shapes — not a "
                  "performance result.**", ""]
    if doc.get("partial"):
        lines += [f"**Partial run: {doc.get('abort_reason', 'aborted')}**", ""]
    lines += [
        f"- command: `{doc['command']}`",
        f"- torch {doc['torch']}, triton {doc['triton']}"
        + (f", CUDA {doc['cuda']}" if doc.get("cuda") else "")
        + f", moekit {doc.get('moekit', '?')}"
        + (f" (git {doc['git_commit'][:10]})" if doc.get("git_commit") else ""),
        f"- ceilings (this run): copy {_fmt_rate(c['copy_GBps'], 'GB/s')}, read "
        f"{_fmt_rate(c['read_GBps'], 'GB/s')} → memory {_fmt_rate(c['mem_GBps'], 'GB/s')}; "
        f"bf16 {_fmt_rate(c['bf16_TFLOPs'], 'TFLOP/s')}"
        + (f", fp16 {_fmt_rate(c['fp16_TFLOPs'], 'TFLOP/s')}" if c.get("fp16_TFLOPs") else "")
        + f", fp8 {_fmt_rate(c['fp8_TFLOPs'], 'TFLOP/s')}",
    ]
    lines += _clock_lines(doc)
    lines += [f"- {note}" for note in doc.get("notes", [])]
    lines.append("")
    lines.append("Cells: median µs (roofline % = floor ÷ time). ⚠ = rel_err over tolerance.")
    lines.append("")
    for graph, label in ((True, "CUDA-graph replay"), (False, "eager")):
        if any(r["impl"] == "moekit" and r["graph"] == graph for r in rows):
            lines += [f"## moekit, {label}", ""]
            lines += _grid(doc, lambda p, m, g=graph: _time_cell(index.get((p, m, "moekit", g))),
                           graph_only=graph)
            lines.append("")
    for impl in dict.fromkeys(r["impl"] for r in rows if r["impl"] != "moekit"):
        lines += [f"## {impl}: µs (moekit speedup)", "",
                  "Graph replay against graph replay where both were captured; "
                  "ᵉ marks eager against eager.", ""]
        lines += _grid(doc, lambda p, m, i=impl: _speedup_cell(index, p, m, i))
        lines.append("")
    lines += _notes_section(rows)
    return "\n".join(lines) + "\n"


def peak_clocks(doc: dict) -> list[tuple[str, int, int | None]]:
    """(name, SM clock in MHz, power in W or None) of each matmul peak the table's run
    sampled clocks for (`clocks.ceilings` in the JSON; the bandwidth pass is not a peak)."""
    peaks = (doc.get("clocks") or {}).get("ceilings") or {}
    return [(name, c["sm_clock_mhz"], c.get("power_w")) for name, c in peaks.items()
            if c and name != "bandwidth" and c.get("sm_clock_mhz")]


def _clock_lines(doc: dict) -> list[str]:
    """The SM clock the matmul peaks and moekit's graph cells ran at (`clocks` in the
    JSON, per row `sm_clock_mhz`): a lower clock in the cells than in the peak is
    throttling, not the kernels."""
    clocks = doc.get("clocks")
    if not clocks:
        return []
    if clocks.get("note") and not clocks.get("ceilings"):
        return [f"- clocks: {clocks['note']}"]
    parts = [f"{name} peak {mhz:,} MHz" + (f" / {watts} W" if watts is not None else "")
             for name, mhz, watts in peak_clocks(doc)]
    cells = [r["sm_clock_mhz"] for r in doc["rows"]
             if r["impl"] == "moekit" and r["graph"] and r.get("sm_clock_mhz")]
    if cells:
        parts.append(f"moekit's graph cells {min(cells):,}–{max(cells):,} MHz "
                     f"(median {statistics.median(cells):,.0f})")
    if not parts:
        return [f"- clocks: not sampled ({clocks.get('note') or 'no samples'})"]
    return [f"- SM clock (nvidia-smi, median within each measurement): {'; '.join(parts)}"]


def _notes_section(rows: list[dict]) -> list[str]:
    worst: dict[str, float] = {}
    for r in rows:
        if r["rel_err"] is not None and math.isfinite(r["rel_err"]):
            worst[r["impl"]] = max(worst.get(r["impl"], 0.0), r["rel_err"])
    lines = ["## Accuracy and notes", ""]
    lines += [f"- worst rel_err of {impl}: {err:.2e}" for impl, err in worst.items()]
    lines += _format_error_lines(rows)
    seen = set()
    for r in rows:
        note = r.get("note")
        if note and (r["impl"], note) not in seen:
            seen.add((r["impl"], note))
            mode = "graph" if r["graph"] else "eager"
            lines.append(f"- {r['preset']} M={r['M']} {r['impl']} {mode}: {note}")
    return lines


def _format_error_lines(rows: list[dict]) -> list[str]:
    """fp8 tables: the range of rel_err_bf16 (the format's own error) per preset."""
    by_preset: dict[str, list[float]] = {}
    for r in rows:
        err = r.get("rel_err_bf16")
        if err is not None and math.isfinite(err):
            by_preset.setdefault(r["preset"], []).append(err)
    return [f"- {preset}: rel_err_bf16 (against the bf16 weights) {min(e):.2e}–{max(e):.2e}"
            for preset, e in by_preset.items()]
