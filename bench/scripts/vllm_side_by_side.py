"""moekit's kernel table in PERF.md's protocol beside PERF.md's vLLM "numbers to beat".

PERF.md's vLLM cells are graph-replay µs after do_bench's memset flush with, in brackets,
floor ÷ time where the floor is bytes over the *copy* bandwidth of that run — and the
bytes are those of that run's routing draw, which at M = 8 hit fewer experts than
moekit's bench draw does on some presets. So beside the raw ratio of times this reports
the ratio of effective bandwidths: vLLM's bytes recovered from its bracket (pct × time ×
its copy GB/s) over its time, against moekit's bytes (its own experts hit) over moekit's
time. Memory-bound cells only for the bandwidth ratio (M ≤ 256 here; above, both
implementations do the same flops and the raw ratio is the fair one).

    python3 bench/scripts/vllm_side_by_side.py --table RESULT.json --perf ../shared/PERF.md \
        --section H200 --out RESULT-side-by-side.md
"""

from __future__ import annotations

import argparse
import json
import re

# PERF.md's preset names in its tables → moekit's preset names (gpt-oss there: silu, no biases).
_NAMES = {"gpt-oss-120b": "gpt-oss-120b-silu"}


def _flush_words(table: dict) -> str:
    """How the table emptied L2 (`moekit bench --l2-flush`). PERF.md's vLLM run used
    do_bench's memset, whose dirty lines the timed call writes back: 6.5–8.5 µs a layer on
    an H200 (bench/NOTES.md, session 10). A read flush leaves clean lines, so against it
    cells closer than that are not decided; `--l2-flush zero` is the like-for-like run."""
    kind = table.get("timing", {}).get("l2_flush", "read")
    return {"zero": "do_bench's 256 MB memset (PERF.md's protocol, as vLLM's)",
            "read": "a 256 MB read (clean lines: no write-back, which vLLM's memset flush "
                    "cost it, ~7 µs a call; cells closer than that are not decided)"}.get(
                kind, f"the {kind!r} flush")


def vllm_cells(perf_text: str, section: str, dtype_label: str) -> tuple[dict, float]:
    """{(preset, M): (µs, floor ÷ time)} of PERF.md's table for `section` ("H100" or
    "H200") and weight format (`bf16`, `fp8 per-tensor`), and that run's copy GB/s."""
    if section == "H200":
        start = perf_text.index("| preset (H200)")
        copy = float(re.search(r"H200 \(2026-11-23; copy (\d+) GB/s", perf_text).group(1))
    else:
        start = perf_text.index("| preset |", perf_text.index("## Numbers to beat"))
        copy = float(re.search(r"copy ([\d,]+) GB/s", perf_text[perf_text.index(
            "## Numbers to beat"):]).group(1).replace(",", ""))
    lines = perf_text[start:].splitlines()
    tokens = [int(c.strip()[2:]) for c in lines[0].strip("|").split("|")[1:]]
    cells = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        parts = [c.strip() for c in line.strip("|").split("|")]
        name, fmt = parts[0].split(" ", 1)
        if fmt != dtype_label:
            continue
        for m, cell in zip(tokens, parts[1:], strict=True):
            us, pct = re.match(r"([\d,.]+) \((\d+)%\)", cell).groups()
            cells[(_NAMES.get(name, name), m)] = (float(us.replace(",", "")), float(pct) / 100)
    return cells, copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", required=True, help="a `moekit bench` result JSON")
    parser.add_argument("--perf", required=True, help="PERF.md")
    parser.add_argument("--section", choices=("H100", "H200"), default="H200")
    parser.add_argument("--out", required=True, help="Markdown file to write")
    args = parser.parse_args()
    table = json.load(open(args.table))
    label = "bf16" if table["dtype"] == "bf16" else "fp8 per-tensor"
    vllm, copy = vllm_cells(open(args.perf).read(), args.section, label)
    ours = {(r["preset"], r["M"]): r for r in table["rows"]
            if r["impl"] == "moekit" and r["graph"]}
    lines = [f"# moekit beside PERF.md's vLLM numbers ({args.section}, {label}) — "
             f"{table['device']}, {table['date']}", "",
             f"- moekit: `{table['command']}` (git {table['git_commit']}), torch "
             f"{table['torch']}, triton {table['triton']}; CUDA-graph replay, L2 emptied "
             f"before each call by {_flush_words(table)}; vLLM's after do_bench's 256 MB "
             "memset (PERF.md's protocol)",
             f"- vLLM: PERF.md's {args.section} table (vLLM 0.33's Triton fused MoE, copy "
             f"{copy:,.0f} GB/s in its run)",
             "- time ratio = vLLM µs ÷ moekit µs (> 1: moekit faster); bandwidth ratio (M ≤ 256, "
             "memory-bound) = moekit's bytes/µs ÷ vLLM's, each with its own routing draw's "
             "experts (vLLM's bytes = its bracket × its µs × its copy GB/s)", "",
             "| preset | M | vLLM µs | moekit µs | time ratio | experts hit (moekit) "
             "| bandwidth ratio |", "|---|---|---|---|---|---|---|"]
    behind = []
    for (name, m), (v_us, v_pct) in vllm.items():
        row = ours.get((name, m))
        if row is None:
            continue
        ratio = v_us / row["time_us"]
        bw = ""
        if m <= 256 and row["bound"] == "memory":
            v_gbps = v_pct * copy  # its bytes (bracket × µs × copy GB/s) over its µs
            bw_ratio = row["bytes"] / row["time_us"] / 1e3 / v_gbps
            bw = f"{bw_ratio:.3f}"
        fair = float(bw) if bw else ratio
        if fair < 1:
            behind.append(f"{name} M = {m}")
        lines.append(f"| {name} | {m} | {v_us:,.0f} | {row['time_us']:,.1f} | {ratio:.3f} | "
                     f"{row['experts_hit']} | {bw or '—'} |")
    lines += ["", "Behind (bandwidth ratio where given, else time ratio, below 1): "
              + (", ".join(behind) if behind else "none") + "."]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
