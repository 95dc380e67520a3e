"""Warp stall reasons of one kernel from Nsight Compute's per-SASS-instruction samples.

    ncu --import R.ncu-rep --page source --csv --print-source sass > R-sass.csv
    python3 bench/scripts/ncu_stall_summary.py R-sass.csv [--top 25]

(`device_check.sh ncustall` writes such CSVs as ncu-stall-gemm{1,2}-sass.log.) The details
page gives the kernel's average stall mix; this says which instructions the samples land
on — a spinning producer's mbarrier wait reads like a memory stall, a math warpgroup
waiting on its wgmma like a barrier — and which loads or stores move excess sectors.
"""

from __future__ import annotations

import argparse
import collections
import csv


def _number(text: str) -> float:
    return 0.0 if text in ("", "-") else float(text.replace(",", ""))


def read_rows(path: str) -> list[dict]:
    """The CSV's instruction rows (whatever ncu printed before its header is skipped)."""
    with open(path) as f:
        lines = f.read().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('"Address"'))
    return list(csv.DictReader(lines[header:]))


def summary(rows: list[dict], top: int) -> list[str]:
    samples = sum(_number(r["Warp Stall Sampling (All Samples)"]) for r in rows)
    reasons = collections.Counter()
    for r in rows:
        for key, value in r.items():
            if key.startswith("stall_") and "Not Issued" not in key:
                reasons[key] += _number(value)
    out = [f"{len(rows)} SASS instructions, {samples:.0f} stall samples", "", "stall reasons:"]
    out += [f"  {k:24s} {v:8.0f}  {100 * v / samples:5.1f}%" for k, v in reasons.most_common(10)]
    out += ["", f"the {top} instructions with the most samples (address, samples, the two "
            "largest reasons):"]
    by_samples = sorted(rows, key=lambda r: -_number(r["Warp Stall Sampling (All Samples)"]))
    for r in by_samples[:top]:
        mine = sorted(((_number(v), k) for k, v in r.items()
                       if k.startswith("stall_") and "Not Issued" not in k), reverse=True)[:2]
        out.append(f"  {r['Address'][-5:]} {_number(r['Warp Stall Sampling (All Samples)']):7.0f}"
                   f"  {r['Source'].strip()[:58]:58s} "
                   + " ".join(f"{k}={v:.0f}" for v, k in mine))
    out += ["", "global accesses with the most excess L2 sectors (address, instruction, "
            "excess / all sectors, warp-level executions):"]
    excess = "L2 Theoretical Sectors Global Excessive"
    for r in sorted(rows, key=lambda r: -_number(r[excess]))[:6]:
        if _number(r[excess]):
            out.append(f"  {r['Address'][-5:]}  {r['Source'].strip()[:44]:44s} "
                       f"{r[excess]} / {r['L2 Theoretical Sectors Global']}, "
                       f"{r['Instructions Executed']}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", help="ncu --page source --csv --print-source sass")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.csv:
        print(f"== {path}")
        print("\n".join(summary(read_rows(path), args.top)))
        print()


if __name__ == "__main__":
    main()
