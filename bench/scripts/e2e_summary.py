"""One Markdown table from the per-family `moekit run` results (`*-e2e-<family>[-fp8].json`).

Usage: python bench/scripts/e2e_summary.py bench/results/h100-sxm-20261123-e2e-*.json \
           --out bench/results/h100-sxm-20261123-e2e-summary.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(result: dict) -> str:
    base, ours = result["runs"][result["experts"]["baseline"]], result["runs"]["moekit"]
    shape, check = result["shape"], result["check"]
    verdict = "passed" if check["passed"] else "**failed**"
    family = result["family"]
    if "fp8" in result["experts"].get("moekit_format", ""):  # `moekit run --fp8-experts`
        family += " (moekit fp8)"
    return (
        f"| {family} | {shape['layers']} | {result['weights_gb']:.1f} | "
        f"{base['prefill_ms']:.2f} | {ours['prefill_ms']:.2f} | "
        f"{result['speedup']['prefill']:.2f}× | {base['tpot_ms']:.2f} | {ours['tpot_ms']:.2f} | "
        f"{result['speedup']['decode']:.2f}× | {check['candidate']['median_rel_l2']:.2e} / "
        f"{check['baseline']['median_rel_l2']:.2e} ({verdict}) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = [json.loads(p.read_text()) for p in sorted(args.results)]
    first = results[0]
    shape = first["shape"]
    lines = [
        f"# End-to-end: transformers' experts vs moekit — {first['device']}",
        "",
        f"- {first['date'][:10]}; torch {first['torch']}, triton {first['triton']}, "
        f"transformers {first['transformers']}",
        f"- each family at its checkpoint's real widths, random weights, bf16, batch "
        f"{shape['batch']}, prompt {shape['prompt_len']} tokens, {shape['new_tokens']} new "
        f"tokens, {first['repeats']} repeat(s); baseline: transformers' "
        f"`{first['experts']['baseline']}` experts",
        "- commands: " + "; ".join(f"`{r['command']}`" for r in results),
        "- check: median per-position logits rel L2 to the same weights in float32, moekit / "
        "the noise level (the baseline's; for a moekit fp8 run, moekit's fp8 reference in "
        "bf16, and the fp8 model in float32 is the oracle); passes within 2 × noise + 5e-3 "
        "(`moekit.e2e.check`)",
        "- sources: " + ", ".join(f"`{p.name}`" for p in sorted(args.results)),
        "",
        "| family | layers | weights GB | prefill ms (baseline) | prefill ms (moekit) | "
        "prefill speedup | TPOT ms (baseline) | TPOT ms (moekit) | decode speedup | "
        "check vs float32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *(row(r) for r in results),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
