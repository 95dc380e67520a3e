"""`moekit bench routing`: the memory-bound stages around the GEMMs, timed on CUDA.

For each preset (E, k, H) and token count M it times, on the GPU:

    route        router logits fp32 [M, E] → ids int32 + weights fp32 [M, k], with the
                 model's own method (`ROUTE_KWARGS`; softmax → top-k → renormalise else)
    plan         ids → DispatchPlan (block_m of the experts heuristic for this M)
    permute      hidden [M, H] → grouped [capacity, H]        (row scatter)
    unpermute    grouped → out [M, H], Σ over k in fp32       (weighted row gather)

Timing (`replay_time_us`): each figure is GPU time per call. N calls are captured in one
CUDA graph, the i-th on input set i mod S, and the graph's replays are timed with CUDA
events; a cell is the median replay ÷ N. A graph launch costs ~1 µs of GPU time, so
short ops are not measured through the host's launch gaps (an eager launch costs
70–90 µs of CPU on the lent VM, and single-kernel `do_bench` samples then include
them). N is sized so a replay holds ≥ `--graph-us` of work. There is no L2 flush;
instead S rotating input sets are drawn so that between two uses of one set the other
sets move ≥ 3 × the L2 size (S capped by `--sets`): a call does not find its inputs
in L2 unless they are tiny (decode), as in a model, where the router's logits were just
written.

Bandwidth is floor bytes ÷ time, reported against the device-to-device copy bandwidth
measured in the same run (`moekit.bench.ceilings`), since permute and unpermute are
copies. Floor bytes count the DRAM traffic the op cannot avoid, never repeats L2 may
serve:

    route      logits read + ids and weights written
    plan       ids read + plan written (tiny: the time is what matters)
    permute    each hidden row read once + each used slot written once (an expert's
               padding rows are zeros the contract requires) + pair_slots + sorted_pairs
    unpermute  each kept pair's slot read once + M rows written + slots and weights

Each op's output is checked against `moekit.reference` (exact for route ids, plan and
permute; relative L2 for unpermute); permute and unpermute are checked on what the
graph replays wrote. Results go to bench/results/<device>-<yyyymmdd>-routing-<dtype>.
{json,md}, named like the kernel table's. Without CUDA nothing is timed: the command
says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime
from functools import partial
from pathlib import Path

from moekit.bench.args import preset_names, token_counts
from moekit.bench.presets import PRESETS, get_preset

ROUTING_TOKEN_COUNTS = (1, 64, 1024, 4096, 16384)
OPS = ("route", "plan", "permute", "unpermute")
DEFAULT_OUT = "bench/results"
NO_CUDA_LINE = "moekit bench routing: no CUDA device, nothing to time (the table is GPU-only)"
L2_MULTIPLE = 3  # other sets' traffic between two uses of one set, in L2 sizes
MAX_CALLS_PER_GRAPH = 256

# Each preset's own routing (route's keyword arguments; "bias" draws a score-correction
# bias). Presets not named here use the default: softmax → top-k → renormalise.
ROUTE_KWARGS = {
    "mixtral-8x7b": {"method": "topk_softmax"},
    "gpt-oss-120b": {"method": "topk_softmax"},
    "deepseek-v3": {"method": "sigmoid", "n_group": 8, "topk_group": 4,
                    "routed_scaling_factor": 2.5, "bias": True},
}


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
    parser.add_argument("--sets", type=int, default=16, metavar="N",
                        help="most input sets rotated inside a graph (default: 16; fewer when "
                        f"{L2_MULTIPLE} × L2 is covered with fewer)")
    parser.add_argument("--graph-us", type=float, default=200, metavar="US",
                        help="GPU work per graph replay, µs: N = calls per graph is sized "
                        "to it (default: 200)")
    parser.add_argument("--rep-ms", type=float, default=30, metavar="MS",
                        help="replay budget per cell, ms (default: 30; at least 5 replays)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"result file directory, '-' for none (default: {DEFAULT_OUT})")
    parser.add_argument("--no-write", action="store_true", help="do not write result files")
    parser.add_argument("--what", default=None, metavar="LABEL",
                        help="label in the file name (default: routing-<dtype>)")


def _flatten(groups):
    return None if groups is None else [x for group in groups for x in group]


def timing_method(args: argparse.Namespace) -> dict:
    """The `timing` object of the result file: how a cell's figure was obtained."""
    return {
        "method": "CUDA-graph replay: N calls in one graph cycling over S input sets, CUDA "
                  "events around each replay, median replay / N (GPU time per call); no L2 "
                  f"flush: S sets so the other sets move >= {L2_MULTIPLE} x L2 between two "
                  "uses of one set",
        "graph_us": args.graph_us, "rep_ms": args.rep_ms, "max_sets": args.sets,
        "max_calls_per_graph": MAX_CALLS_PER_GRAPH,
    }


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
    if args.sets < 2:
        print("--sets: expected at least 2", file=sys.stderr)
        return 2
    presets = [get_preset(n) for n in dict.fromkeys(_flatten(args.presets) or PRESETS)]
    tokens = sorted(set(_flatten(args.tokens) or ROUTING_TOKEN_COUNTS))
    ops = tuple(op for op in OPS if op in (args.ops or OPS))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2_bytes = getattr(props, "L2_cache_size", 0) or 50 * 2**20
    print(f"device: {props.name}; measuring ceilings …", file=sys.stderr, flush=True)
    ceilings = measure_cuda(args.dtype)
    print(f"ceilings: {ceilings.summary()}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    rows = []
    for preset in presets:
        for m in tokens:
            for row in _cell_rows(preset, m, ops, dtype, args, ceilings.copy_GBps, l2_bytes):
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
        "l2_bytes": l2_bytes,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "moekit": moekit.__version__,
        "dtype": args.dtype,
        "seed": args.seed,
        "timing": timing_method(args),
        "notes": [
            "route: N(0, 1) fp32 logits; the model's routing (mixtral, gpt-oss: top-k then "
            "softmax; deepseek-v3: grouped sigmoid with bias, 8 groups keep 4, × 2.5; others: "
            "softmax, top-k, renormalise); plan/permute/unpermute use its ids",
            "plan block_m: moekit.tuning.pick_block_m for (M, E, k), as fused_experts uses",
            "time: GPU time per call from CUDA-graph replay (N calls per graph over S rotating "
            "input sets, median replay / N), no host launch gaps, no L2 flush",
            "GBps = floor bytes ÷ time, floor = DRAM traffic the op cannot avoid (permute: "
            "each hidden row read once + each used slot written once; unpermute: each kept "
            "slot read once + M rows written); copy_pct = GBps ÷ copy_GBps of this run",
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


def sets_needed(op_bytes: int, l2_bytes: int, max_sets: int) -> int:
    """Input sets to rotate so the others move ≥ L2_MULTIPLE × L2 between two uses of one."""
    if op_bytes <= 0:
        return 2
    return max(2, min(max_sets, 1 + -(-L2_MULTIPLE * l2_bytes // op_bytes)))


def calls_per_graph(call_us: float, num_sets: int, graph_us: float) -> int:
    """Calls in one graph: a multiple of the set count holding ≥ graph_us of work."""
    rounds = max(1, math.ceil(graph_us / max(call_us * num_sets, 1e-3)))
    return max(num_sets, min(rounds, MAX_CALLS_PER_GRAPH // num_sets) * num_sets)


def replay_time_us(calls: list, *, graph_us: float = 200, rep_ms: float = 30) -> dict:
    """GPU time per call of `calls` (one per input set), through CUDA-graph replay.

    Every call is warmed up (compiled) on a side stream; one graph of one call per set
    sizes N (`calls_per_graph`); a graph of N calls, the i-th being calls[i % S], is
    replayed ≥ 5 times between CUDA events. Returns time_us (median replay ÷ N),
    p20_us/p80_us, calls_per_graph and replays. The calls must not synchronise with
    the host (a capture would fail).
    """
    import torch

    def capture(n: int):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n):
                calls[i % len(calls)]()
        return graph

    def replays_ms(graph, reps: int) -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up off the capture stream
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    probe = capture(len(calls))
    probe.replay()
    call_us = statistics.median(replays_ms(probe, 3)) * 1e3 / len(calls)
    del probe
    n = calls_per_graph(call_us, len(calls), graph_us)
    graph = capture(n)
    graph.replay()  # the first replay uploads the graph
    reps = max(5, min(500, int(rep_ms * 1e3 / max(call_us * n, 1.0))))
    samples = sorted(t * 1e3 / n for t in replays_ms(graph, reps))
    del graph
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]  # noqa: E731
    return {"time_us": statistics.median(samples), "p20_us": pick(0.2), "p80_us": pick(0.8),
            "calls_per_graph": n, "replays": reps}


class _Sets:
    """Input sets of one (preset, M) cell, drawn on first use and kept for the cell."""

    def __init__(self, preset, m: int, dtype, block_m: int, seed: int, device: str = "cuda"):
        self.preset, self.m, self.dtype, self.block_m = preset, m, dtype, block_m
        self.seed, self.device = seed, device
        self.kwargs = dict(ROUTE_KWARGS.get(preset.name, {"renormalize": True}))
        self._cache: dict = {}

    def _gen(self, what: str, i: int):
        import torch

        tag = OPS.index(what) if what in OPS else len(OPS) + ("hidden", "bias").index(what)
        return torch.Generator(device=self.device).manual_seed(
            ((self.seed * 1_000_003 + self.m) * 101 + i) * 11 + tag)

    def _get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def route_kwargs(self) -> dict:
        import torch

        kw = {k: v for k, v in self.kwargs.items() if k != "bias"}
        if self.kwargs.get("bias"):
            kw["e_score_correction_bias"] = self._get("bias", lambda: 0.1 * torch.randn(
                self.preset.num_experts, generator=self._gen("bias", 0), device=self.device))
        return kw

    def logits(self, i: int):
        import torch

        return self._get(("logits", i), lambda: torch.randn(
            (self.m, self.preset.num_experts), generator=self._gen("route", i),
            device=self.device))

    def topk(self, i: int):
        from moekit.routing import route

        return self._get(("topk", i), lambda: route(self.logits(i), self.preset.top_k,
                                                    **self.route_kwargs()))

    def plan(self, i: int):
        from moekit.dispatch import dispatch_plan

        return self._get(("plan", i), lambda: dispatch_plan(
            self.topk(i).ids, self.preset.num_experts, self.block_m))

    def hidden(self, i: int):
        import torch

        return self._get(("hidden", i), lambda: torch.randn(
            (self.m, self.preset.hidden), generator=self._gen("hidden", i),
            device=self.device).to(self.dtype))

    def grouped(self, i: int):
        from moekit.permute import permute

        return self._get(("grouped", i), lambda: permute(
            self.hidden(i), self.plan(i), top_k=self.preset.top_k)[0])


def op_bytes(op: str, *, m: int, E: int, k: int, H: int, elem: int, capacity: int, used: int,
             block_m: int, kept: int) -> int:
    """Floor bytes of one call: DRAM traffic the op cannot avoid (module docstring)."""
    if op == "route":
        return m * E * 4 + m * k * 8
    if op == "plan":
        return 4 * (m * k + capacity + capacity // block_m + E + 1 + m * k)
    if op == "permute":
        return (m + used) * H * elem + 4 * (m * k + capacity)
    if op == "unpermute":
        return (kept + m) * H * elem + 8 * m * k
    raise ValueError(f"unknown op {op!r}")


def _cell_rows(preset, m: int, ops: tuple, dtype, args, copy_GBps: float, l2_bytes: int):
    """Check each op once, time it through graph replay over rotating input sets; yield rows."""
    import torch

    from moekit import reference
    from moekit.permute import permute, unpermute
    from moekit.routing import route
    from moekit.tuning.heuristic import pick_block_m

    E, k, H = preset.num_experts, preset.top_k, preset.hidden
    block_m = pick_block_m(m, E, k)
    elem = torch.empty((), dtype=dtype).element_size()
    sets = _Sets(preset, m, dtype, block_m, args.seed)
    plan = sets.plan(0)
    kept = int((plan.pair_slots >= 0).sum())
    size = {"m": m, "E": E, "k": k, "H": H, "elem": elem, "capacity": plan.capacity,
            "used": int(plan.expert_offsets[-1]), "block_m": block_m, "kept": kept}

    def row(op: str, make_call, check) -> dict:
        nbytes = op_bytes(op, **size)
        n_sets = sets_needed(nbytes, l2_bytes, args.sets)
        calls = [make_call(i) for i in range(n_sets)]
        timing = replay_time_us(calls, graph_us=args.graph_us, rep_ms=args.rep_ms)
        t = timing["time_us"]
        gbps = nbytes / (t * 1e-6) / 1e9
        return {"preset": preset.name, "E": E, "topk": k, "H": H, "M": m, "op": op,
                "dtype": {"route": "fp32", "plan": "int32"}.get(op, args.dtype),
                "block_m": block_m, "time_us": round(t, 2), "p20_us": round(timing["p20_us"], 2),
                "p80_us": round(timing["p80_us"], 2), "bytes": nbytes,
                "GBps": round(gbps, 1), "copy_pct": round(100 * gbps / copy_GBps, 1),
                "graph": True, "input_sets": n_sets,
                "calls_per_graph": timing["calls_per_graph"], "replays": timing["replays"],
                "check": check()}

    if "route" in ops:
        kw = sets.route_kwargs()

        def check_route():
            # Rows whose float32 and float64 references disagree hinge on a near-tie of
            # scores (possible with a bias or groups); every other row must match exactly.
            logits = sets.logits(0)
            ref = reference.route(logits, k, **kw).ids
            exact = reference.route(logits.double(), k, **{
                key: v.double() if torch.is_tensor(v) else v for key, v in kw.items()}).ids
            ok = (sets.topk(0).ids == ref).all(1) | (ref != exact).any(1)
            return "ok" if bool(ok.all()) else f"ids differ on {int((~ok).sum())} rows"

        yield row("route", lambda i: partial(route, sets.logits(i), k, **kw), check_route)
    if "plan" in ops:
        from moekit.dispatch import dispatch_plan

        def check_plan():
            ref = reference.dispatch_plan(sets.topk(0).ids, E, block_m)
            same = all(torch.equal(getattr(plan, f), getattr(ref, f)) for f in
                       ("sorted_pairs", "block_experts", "expert_offsets", "pair_slots"))
            return "ok" if same else "plan differs"

        yield row("plan", lambda i: partial(dispatch_plan, sets.topk(i).ids, E, block_m),
                  check_plan)
    if "permute" in ops:
        outs: dict = {}

        def permute_call(i):
            outs[i] = torch.empty_like(sets.grouped(i))
            return partial(permute, sets.hidden(i), sets.plan(i), top_k=k, out=outs[i])

        def check_permute():  # on what the replays wrote
            ref, _ = reference.permute(sets.hidden(0), plan, top_k=k)
            used = size["used"]
            same = torch.equal(outs[0][:used].view(torch.int16), ref[:used].view(torch.int16))
            return "ok" if same else "rows differ"

        yield row("permute", permute_call, check_permute)
        outs.clear()
    if "unpermute" in ops:
        outs = {}

        def unpermute_call(i):
            outs[i] = torch.empty_like(sets.hidden(i))
            return partial(unpermute, sets.grouped(i), sets.plan(i), sets.topk(i).weights,
                           out=outs[i])

        def check_unpermute():  # on what the replays wrote
            err = _rel_err(outs[0], reference.unpermute(sets.grouped(0), plan,
                                                        sets.topk(0).weights))
            return "ok" if err <= 1e-3 else f"rel_err {err:.1e}"

        yield row("unpermute", unpermute_call, check_unpermute)
        outs.clear()


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
