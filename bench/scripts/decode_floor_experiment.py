"""Experiment: how fast can one launch read a decode layer's weights, and what does the
second launch cost?

The decode layer at M = 1 is two launches (the direct GEMM1, then GEMM2) and sits at
44–59% of its roofline on the small-expert presets (granite, qwen3), which counts neither
a launch nor a kernel's ramp-up and drain. The lever left untried is one persistent
launch for both GEMMs (bench/NOTES.md: PDL measured slower, its early programs' L2
prefetch evicted by GEMM1's stream). Before building it, this bounds what it can win.
Per cell (CUDA-graph replay, L2 flushed by a read, median µs), on a buffer the size of the
hit experts' bytes (w13 then w2):
- `empty1` / `empty2`: a graph of one / two tiny launches;
- `read_all`: one streaming read (16-byte loads) of w13's and w2's bytes, several shapes
  of the streamer, best kept; `read_w13`, `read_w2`: each alone; `read_two`: the two
  reads as two launches in one graph (what the layer's structure costs a perfect kernel);
- `chain_wait`: one launch in which w2's programs first wait until every w13 program is
  done (a per-launch counter, tickets taken in order so no waiter blocks a reader), then
  read — one launch, two dependent phases; `chain_prefetch`: the same, but w2's programs
  load their bytes first and wait after (GEMM2's weights do not depend on GEMM1);
- `layer`, `gemm1`, `gemm2`: the library's layer and its two direct GEMMs alone.
If `chain_prefetch` is well under `read_two` and near `read_all`, a persistent layer is
worth building; the layer's distance to `read_two` is what its kernels lose on their own.
Each row also carries the run's memory bandwidth (`mem_GBps`, as `moekit bench` measures
it), so `target_check.py --launch-floor` can take the µs a perfect read pays over its
bytes' floor and say which decode cells no layer of one or two launches can bring to 85%.

    PYTHONPATH=src python3 bench/scripts/decode_floor_experiment.py --out $OUT
"""

from __future__ import annotations

import functools
import sys

import torch
import triton
import triton.language as tl
from half_tile_experiment import run_cells  # this directory: the command line and the loop

import moekit
from moekit.activation import Activation
from moekit.bench.ceilings import measure_cuda
from moekit.bench.inputs import experts_hit, make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.stream_read import stream_read
from moekit.bench.timing import graph_replay_us
from moekit.experts_direct import gemm2_arrivals, launch_direct_gemm1, launch_direct_gemm2
from moekit.tuning.heuristic import default_config

CELLS = [("qwen3-30b-a3b", 1), ("granite-3.0-3b-a800m", 1), ("olmoe-1b-7b", 1),
         ("deepseek-v2-lite", 1), ("gpt-oss-120b", 1), ("qwen3-30b-a3b", 4),
         ("granite-3.0-3b-a800m", 4)]
# (elements per load, loads per program, warps): the streamer's shapes tried.
STREAMERS = [(2048, 8, 8), (1024, 8, 4), (4096, 4, 8), (1024, 4, 4), (2048, 4, 4)]


@triton.jit
def _tiny_kernel(x_ptr):
    tl.store(x_ptr + tl.program_id(0), 1.0)


@triton.jit
def _chain_read_kernel(w13_ptr, w2_ptr, partial_ptr, counters_ptr, n1, n2,
                       PREFETCH: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """Ticket t < n1 reads chunk t of w13 and arrives; t ≥ n1 reads chunk t − n1 of w2,
    before (PREFETCH) or after waiting for all n1 arrivals. counters: ticket, arrivals,
    finished; the last program to finish zeroes them for the next launch."""
    ticket = tl.atomic_add(counters_ptr, 1, sem="relaxed")
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if ticket < n1:
        base = ticket.to(tl.int64) * (BLOCK * UNROLL)
        for u in tl.static_range(UNROLL):
            acc += tl.load(w13_ptr + base + u * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
        total = tl.sum(acc)
        tl.atomic_add(counters_ptr + 1, 1, sem="release")
    else:
        base = (ticket - n1).to(tl.int64) * (BLOCK * UNROLL)
        if PREFETCH:
            for u in tl.static_range(UNROLL):
                acc += tl.load(w2_ptr + base + u * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
            while tl.atomic_add(counters_ptr + 1, 0, sem="acquire") < n1:
                pass
        else:
            while tl.atomic_add(counters_ptr + 1, 0, sem="acquire") < n1:
                pass
            for u in tl.static_range(UNROLL):
                acc += tl.load(w2_ptr + base + u * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
        total = tl.sum(acc)
    tl.store(partial_ptr + ticket, total)
    if tl.atomic_add(counters_ptr + 2, 1, sem="acq_rel") == n1 + n2 - 1:
        tl.store(counters_ptr, 0)
        tl.store(counters_ptr + 1, 0)
        tl.store(counters_ptr + 2, 0)


def _stream(x: torch.Tensor, partials: torch.Tensor, shape) -> None:
    block, unroll, warps = shape
    stream_read(x, partials, block=block, unroll=unroll, num_warps=warps)


def _buffer(nbytes: int, chunk: int, dev) -> torch.Tensor:
    """bf16 N(0,1) of at least `nbytes`, a whole number of `chunk` elements."""
    numel = triton.cdiv(nbytes // 2, chunk) * chunk
    return torch.randn(numel, dtype=torch.bfloat16, device=dev)


def _time_streamer(bytes13: int, bytes2: int, shape, dev) -> dict:
    """µs of the reads and chains of one streamer shape over buffers of w13's and w2's bytes."""
    chunk = shape[0] * shape[1]
    a, b = _buffer(bytes13, chunk, dev), _buffer(bytes2, chunk, dev)
    both = torch.cat([a, b])
    parts = torch.empty(both.numel() // chunk, dtype=torch.float32, device=dev)
    times = {
        "read_all": graph_replay_us(lambda: _stream(both, parts, shape)),
        "read_w13": graph_replay_us(lambda: _stream(a, parts, shape)),
        "read_w2": graph_replay_us(lambda: _stream(b, parts, shape)),
        "read_two": graph_replay_us(lambda: (_stream(a, parts, shape),
                                             _stream(b, parts, shape))),
    }
    counters = torch.zeros(3, dtype=torch.int32, device=dev)
    n1, n2 = a.numel() // chunk, b.numel() // chunk
    for prefetch in (False, True):
        def chain(prefetch=prefetch):
            _chain_read_kernel[(n1 + n2,)](a, b, parts, counters, n1, n2, PREFETCH=prefetch,
                                            BLOCK=shape[0], UNROLL=shape[1],
                                            num_warps=shape[2])
        times["chain_prefetch" if prefetch else "chain_wait"] = graph_replay_us(chain)
        torch.cuda.synchronize()
        if counters.abs().sum().item():
            raise RuntimeError(f"chain counters not reset: {counters.tolist()}")
    return times


@functools.cache
def _mem_gbps() -> float:
    """The run's memory bandwidth as `moekit bench` measures it, once a run."""
    return measure_cuda().mem_GBps


def run_cell(name: str, m: int, log) -> dict:
    preset = PRESETS[name]
    dev = torch.device("cuda")
    w = make_weights(preset, torch.bfloat16, dev)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, dev)
    ids, weights = topk.ids.to(torch.int32), topk.weights.float()
    E, n1_rows, H = w.w13.shape
    inter_size = w.w2.shape[2]
    hit = experts_hit(ids, E)
    bytes13, bytes2 = hit * n1_rows * H * 2, hit * H * inter_size * 2
    row = {"preset": name, "M": m, "experts_hit": hit, "w13_MB": bytes13 / 1e6,
           "w2_MB": bytes2 / 1e6, "mem_GBps": _mem_gbps()}
    tiny = torch.zeros(4, device=dev)
    row["empty1_us"] = graph_replay_us(lambda: _tiny_kernel[(1,)](tiny))
    row["empty2_us"] = graph_replay_us(lambda: (_tiny_kernel[(1,)](tiny),
                                                _tiny_kernel[(1,)](tiny)))
    best = {}
    for shape in STREAMERS:
        times = _time_streamer(bytes13, bytes2, shape, dev)
        for key, us in times.items():
            row[f"{key}_{shape[0]}x{shape[1]}w{shape[2]}_us"] = us
            if key not in best or us < best[key][0]:
                best[key] = (us, shape)
    for key, (us, shape) in best.items():
        row[f"{key}_us"] = us
        row[f"{key}_shape"] = list(shape)
    cfg = default_config(m, E, ids.shape[1], H, inter_size)
    act = Activation.parse(preset.activation)
    out = torch.empty_like(hidden)
    row["layer_us"] = graph_replay_us(lambda: moekit.fused_experts(
        hidden, w.w13, w.w2, ids, weights, activation=act, b13=w.b13, b2=w.b2, out=out))
    if cfg.block_m == 1:
        flat = cfg.as_ints()
        arrivals = gemm2_arrivals(ids, H, flat[6:11])
        inter = launch_direct_gemm1(hidden, w.w13, w.b13, ids, weights, act.kind, act.alpha,
                                    act.limit, False, flat[1:6], arrivals)
        row["gemm1_us"] = graph_replay_us(lambda: launch_direct_gemm1(
            hidden, w.w13, w.b13, ids, weights, act.kind, act.alpha, act.limit, False,
            flat[1:6], arrivals))
        row["gemm2_us"] = graph_replay_us(lambda: launch_direct_gemm2(
            inter, w.w2, w.b2, ids, weights, True, flat[6:11], out, arrivals))
    rate = (bytes13 + bytes2) / row["read_all_us"]
    floor_us = (bytes13 + bytes2) / row["mem_GBps"] / 1e3
    log(f"{name} M={m}: {hit} experts, {(bytes13 + bytes2) / 1e6:.0f} MB; empty 1/2 "
        f"{row['empty1_us']:.1f}/{row['empty2_us']:.1f}; floor {floor_us:.1f} at "
        f"{row['mem_GBps']:.0f} GB/s; read all {row['read_all_us']:.1f} "
        f"({rate / 1e3:.0f} GB/s) w13 {row['read_w13_us']:.1f} w2 {row['read_w2_us']:.1f} "
        f"two {row['read_two_us']:.1f}; chain wait {row['chain_wait_us']:.1f} prefetch "
        f"{row['chain_prefetch_us']:.1f}; layer {row['layer_us']:.1f}"
        + (f" (GEMM1 {row['gemm1_us']:.1f}, GEMM2 {row['gemm2_us']:.1f})"
           if "gemm1_us" in row else ""))
    return row


if __name__ == "__main__":
    sys.exit(run_cells("decode-floor-experiment", CELLS, run_cell))
