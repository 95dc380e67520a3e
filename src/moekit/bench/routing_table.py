"""`moekit bench-routing`: the memory-bound stages around the GEMMs, timed on CUDA.

For each preset (E, k, H) and token count M it times, on the GPU:

    route        router logits fp32 [M, E] → ids int32 + weights fp32 [M, k]
    plan         ids → DispatchPlan (block_m of the experts heuristic for this M)
    permute      hidden [M, H] → grouped [capacity, H]        (a row gather)
    unpermute    grouped → out [M, H], Σ over k in fp32       (a weighted row gather)

Every figure is a median of `triton.testing.do_bench` samples (L2 flushed before each
call); on top of that each timed call takes the next of `--sets` independently drawn
input sets, so no call finds its inputs left in L2 by the previous one. Bandwidth is
bytes the op must move ÷ time, reported against the device-to-device copy bandwidth
measured in the same run (`moekit.bench.ceilings`), since permute and unpermute are
copies:

    route      logits read + ids and weights written
    plan       ids read + plan written (tiny: the time is what matters)
    permute    kept pairs' rows read + used slots' rows written (padding zeros count),
               + row indices
    unpermute  kept pairs' rows read + M rows written, + slots and weights

Each op's output on the first input set is checked against `moekit.reference`
(exact for route ids, plan and permute; relative L2 for unpermute). Results go to
bench/results/<device>-<yyyymmdd>-routing-<dtype>.{json,md}, named like the kernel
table's. Without CUDA nothing is timed: the command says so and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path

from moekit.bench.args import preset_names, token_counts
from moekit.bench.presets import PRESETS, get_preset

ROUTING_TOKEN_COUNTS = (1, 64, 1024, 4096, 16384)
OPS = ("route", "plan", "permute", "unpermute")
DEFAULT_OUT = "bench/results"
NO_CUDA_LINE = "moekit bench-routing: no CUDA device, nothing to time (the table is GPU-only)"


def add_routing_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the routing/permute table."""
    parser.add_argument("--presets", nargs="+", type=preset_names, action="extend", metavar="NAME",
                        help=f"presets, space- or comma-separated (default: {', '.join(PRESETS)})")
    parser.add_argument("--tokens", nargs="+", type=token_counts, action="extend", metavar="M",
                        help="token counts (default: "
                        f"{' '.join(map(str, ROUTING_TOKEN_COUNTS))})")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=None,
                        help=f"ops to time (default: all of {', '.join(OPS)})")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16",
                        help="dtype of hidden rows (router logits are fp32; default: bf16)")
    parser.add_argument("--sets", type=int, default=4, metavar="N",
                        help="input sets rotated between timed calls (default: 4)")
    parser.add_argument("--rep-ms", type=float, default=100, metavar="MS",
                        help="do_bench measurement budget per cell, ms (default: 100)")
    parser.add_argument("--warmup-ms", type=float, default=10, metavar="MS",
                        help="do_bench warm-up budget per cell, ms (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"result file directory, '-' for none (default: {DEFAULT_OUT})")
    parser.add_argument("--no-write", action="store_true", help="do not write result files")
    parser.add_argument("--what", default=None, metavar="LABEL",
                        help="label in the file name (default: routing-<dtype>)")


def _flatten(groups):
    return None if groups is None else [x for group in groups for x in group]


def run_routing_bench(args: argparse.Namespace) -> int:
    """Time the table; progress to stderr, Markdown to stdout, files under --out."""
    import torch
    import triton

    import moekit
    from moekit.bench.ceilings import measure_cuda
    from moekit.bench.results import result_paths
    from moekit.device import device_slug

    if not torch.cuda.is_available():
        print(NO_CUDA_LINE, file=sys.stderr)
        return 0
    if args.sets < 1:
        print("--sets: expected at least 1", file=sys.stderr)
        return 2
    presets = [get_preset(n) for n in dict.fromkeys(_flatten(args.presets) or PRESETS)]
    tokens = sorted(set(_flatten(args.tokens) or ROUTING_TOKEN_COUNTS))
    ops = tuple(op for op in OPS if op in (args.ops or OPS))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    print(f"device: {props.name}; measuring ceilings …", file=sys.stderr, flush=True)
    ceilings = measure_cuda(args.dtype)
    print(f"ceilings: {ceilings.summary()}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    rows = []
    for preset in presets:
        for m in tokens:
            for row in _cell_rows(preset, m, ops, dtype, args, ceilings.copy_GBps):
                rows.append(row)
                print(f"{preset.name} M={m} {row['op']}: {row['time_us']} µs, "
                      f"{row['GBps']} GB/s, check {row['check']}", file=sys.stderr, flush=True)
            torch.cuda.empty_cache()

    now = datetime.now().astimezone()
    doc = {
        "device": props.name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": now.isoformat(timespec="seconds"),
        "command": getattr(args, "command_line", None) or shlex.join(sys.argv),
        "ceilings": ceilings.to_json(),
        "title": "moekit routing and permute table",
        "device_slug": device_slug(props.name),
        "capability": f"sm_{props.major}{props.minor}",
        "sm_count": props.multi_processor_count,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "moekit": moekit.__version__,
        "dtype": args.dtype,
        "seed": args.seed,
        "timing": {"method": "triton.testing.do_bench, L2 flushed before each call, median",
                   "rep_ms": args.rep_ms, "warmup_ms": args.warmup_ms,
                   "input_sets": args.sets},
        "notes": [
            "route: softmax over N(0, 1) fp32 logits, top-k renormalised, every preset",
            "plan block_m: moekit.tuning.pick_block_m for (M, E, k), as fused_experts uses",
            "GBps = bytes the op must move ÷ median time; copy_pct = GBps ÷ copy_GBps of "
            "this run (bytes per op in the module docstring of moekit.bench.routing_table)",
        ],
        "elapsed_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    markdown = render_routing_markdown(doc)
    print(markdown)
    if not args.no_write and args.out != "-":
        what = args.what or f"routing-{args.dtype}"
        json_path, md_path = result_paths(args.out, doc["device_slug"],
                                          now.strftime("%Y%m%d"), what)
        _write(doc, markdown, json_path, md_path)
        print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


def _write(doc: dict, markdown: str, json_path: Path, md_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    md_path.write_text(markdown)


def _rotating(calls: list):
    """One callable that runs the next of `calls` each time (a different input set)."""
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def _cell_rows(preset, m: int, ops: tuple, dtype, args, copy_GBps: float, device: str = "cuda"):
    """Draw `--sets` input sets for (preset, M), check each op once, time it; yield rows."""
    import torch
    from triton.testing import do_bench

    from moekit import reference
    from moekit.dispatch import dispatch_plan
    from moekit.permute import permute, unpermute
    from moekit.routing import route
    from moekit.tuning.heuristic import pick_block_m

    E, k, H = preset.num_experts, preset.top_k, preset.hidden
    block_m = pick_block_m(m, E, k)
    elem = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + m)
    sets = []
    for _ in range(args.sets):
        logits = torch.randn((m, E), generator=gen, device=device)
        hidden = torch.randn((m, H), generator=gen, device=device).to(dtype)
        topk = route(logits, k, renormalize=True)
        plan = dispatch_plan(topk.ids, E, block_m)
        grouped, _ = permute(hidden, plan, top_k=k)
        sets.append((logits, hidden, topk, plan, grouped))
    logits, hidden, topk, plan, grouped = sets[0]
    kept = m * k  # softmax top-k routes every pair to a real expert
    used = int(plan.expert_offsets[-1])

    def row(op: str, calls: list, nbytes: int, check: str) -> dict:
        fn = _rotating(calls)
        fn()
        ms = do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
        gbps = nbytes / (ms * 1e-3) / 1e9
        return {"preset": preset.name, "E": E, "topk": k, "H": H, "M": m, "op": op,
                "dtype": {"route": "fp32", "plan": "int32"}.get(op, args.dtype),
                "block_m": block_m, "time_us": round(ms * 1e3, 2), "bytes": nbytes,
                "GBps": round(gbps, 1), "copy_pct": round(100 * gbps / copy_GBps, 1),
                "check": check}

    if "route" in ops:
        ref = reference.route(logits, k, renormalize=True)
        check = "ok" if torch.equal(topk.ids, ref.ids) else "ids differ"
        calls = [lambda s=s: route(s[0], k, renormalize=True) for s in sets]
        yield row("route", calls, m * E * 4 + m * k * 8, check)
    if "plan" in ops:
        ref = reference.dispatch_plan(topk.ids, E, block_m)
        same = all(torch.equal(getattr(plan, f), getattr(ref, f))
                   for f in ("sorted_pairs", "block_experts", "expert_offsets", "pair_slots"))
        calls = [lambda s=s: dispatch_plan(s[2].ids, E, block_m) for s in sets]
        nbytes = 4 * (m * k + plan.capacity + plan.capacity // block_m + E + 1 + m * k)
        yield row("plan", calls, nbytes, "ok" if same else "plan differs")
    if "permute" in ops:
        ref, _ = reference.permute(hidden, plan, top_k=k)
        same = torch.equal(grouped[:used].view(torch.int16), ref[:used].view(torch.int16))
        outs = [torch.empty_like(s[4]) for s in sets]
        calls = [lambda s=s, o=o: permute(s[1], s[3], top_k=k, out=o)
                 for s, o in zip(sets, outs, strict=True)]
        nbytes = (kept + used) * H * elem + used * 4
        yield row("permute", calls, nbytes, "ok" if same else "rows differ")
        del outs
    if "unpermute" in ops:
        out = unpermute(grouped, plan, topk.weights)
        err = _rel_err(out, reference.unpermute(grouped, plan, topk.weights))
        outs = [torch.empty_like(s[1]) for s in sets]
        calls = [lambda s=s, o=o: unpermute(s[4], s[3], s[2].weights, out=o)
                 for s, o in zip(sets, outs, strict=True)]
        nbytes = (kept + m) * H * elem + kept * 8
        yield row("unpermute", calls, nbytes, "ok" if err <= 1e-3 else f"rel_err {err:.1e}")


def _rel_err(out, ref) -> float:
    a, e = out.double(), ref.double()
    denom = float(e.norm())
    return float((a - e).norm()) / denom if denom > 0 else float((a - e).norm())


def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    t = row["time_us"]
    text = f"{t:.1f}" if t < 100 else f"{t:,.0f}"
    flag = "" if row["check"] == "ok" else " ⚠"
    return f"{text} ({row['GBps']:,.0f} GB/s, {row['copy_pct']:.0f}%){flag}"


def render_routing_markdown(doc: dict) -> str:
    """One preset × M table per op: median µs (GB/s, % of the measured copy bandwidth)."""
    rows = doc["rows"]
    index = {(r["preset"], r["M"], r["op"]): r for r in rows}
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    tokens = sorted({r["M"] for r in rows})
    c = doc["ceilings"]
    lines = [f"# {doc['title']} — {doc['device']}, {doc['date'][:10]}", "",
             f"- command: `{doc['command']}`",
             f"- torch {doc['torch']}, triton {doc['triton']}, CUDA {doc['cuda']}, "
             f"moekit {doc['moekit']}",
             f"- copy bandwidth (this run): {c['copy_GBps']:,.0f} GB/s",
             *[f"- {note}" for note in doc["notes"]], "",
             "Cells: median µs (GB/s, % of copy bandwidth). ⚠ = output check failed.", ""]
    for op in dict.fromkeys(r["op"] for r in rows):
        lines += [f"## {op}", "",
                  "| preset | " + " | ".join(f"M={m}" for m in tokens) + " |",
                  "|---|" + "---|" * len(tokens)]
        for p in presets:
            lines.append(f"| {p} | " + " | ".join(_cell(index.get((p, m, op))) for m in tokens)
                         + " |")
        lines.append("")
    failed = [r for r in rows if r["check"] != "ok"]
    lines += [f"- check failed: {r['preset']} M={r['M']} {r['op']}: {r['check']}" for r in failed]
    return "\n".join(lines) + "\n"
