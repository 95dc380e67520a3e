"""Experiment: fp8 GEMM1 of the prefill path as a warp-specialised Gluon kernel.

GEMM1 is the larger part of fp8 prefill: on an H200, qwen3 M = 4096 per-tensor spends 375
of ~610 µs there, at 37% of the fp8 peak (logs/h200-20261202-fp8-stage-profile-s12-*).
Its A rows are gathered — each (token, expert) pair reads its token's row — and Hopper's
TMA cannot gather. Here the quantised tokens are first copied into plan order, one row
per plan slot (`x_sorted` [capacity, H], what the quantiser could write directly; the
copy's time is reported), so GEMM1 reads A tiles by TMA as the Gluon GEMM2 does
(`moekit._gluon_gemm2`):

    producer warpgroup    per 128-deep K step: A [128, 128] (plan rows), the expert's gate
                          rows [128, 128] and up rows [128, 128] — 48 KB a stage
    two math warpgroups   64 rows each; gate and up products promoted per stage into two
                          fp32 accumulators (one product in flight); epilogue: constant
                          scales, silu(gate) · up, each row's 1×128 amax → its scale, the
                          fp8 values by TMA store, the scales by pointer

One output tile is 128 intermediate columns: one 1×128 group of GEMM2's input, so the
quantisation needs no exchange between tiles. No tail tiles, no bias (the presets timed
have none). Schemes: per-tensor (scales in the epilogue) and 128×128 blocks with 1×128
input groups (per-K scales every stage).

Against, in the same run: the library's `_gemm1_fp8_kernel` on the same quantised weights
and tokens (its CUDA time under torch.profiler, inside the whole fp8 layer), and the fp8
dense peak. Correctness: up to 16 sampled row blocks of the dequantised output against
float32 products of the same fp8 values (the output's own fp8 rounding: ~3e-2 relative,
so the check is loose — it catches wrong rows, experts, columns or scales, not ulps).

    PYTHONPATH=src python3 bench/scripts/gluon_gemm1_experiment.py --out $OUT
    PYTHONPATH=src python3 bench/scripts/gluon_gemm1_experiment.py --compile-only
        (on a CPU: compiles each scheme's kernel for sm_90 through ptxas, prints resources)

Compiled on the CPU (session 12): 213 KB of shared memory (4 stages); per-tensor without
spills; block scales with 960 bytes of spill stores. Measured (session 13, 7b5937e,
bench/results/h200-20261202-gluon-gemm1-experiment.md): per-tensor 0.71–0.79× the
library's GEMM1 time with the copy — adopted as `moekit._gluon_gemm1` —, block scales
1.30–1.59× slower. The spill was not the three [64, 128] accumulators themselves: the
block form added `part * scale` to gate while `part` — the next MMA's accumulator
operand — had to stay alive, so a fourth [64, 128] temporary existed. Scaling the
product in its own registers (`part = part * scale`, then added) leaves 16 bytes of
spill (session 13, compiled only; to be re-measured). Since 230f3a8 the library runs the
per-tensor GEMM1 as Gluon itself: `device_check.sh gluon1` sets MOEKIT_GLUON=0 so the
baseline stays the Triton GEMM1.
"""

from __future__ import annotations

import argparse
import os

import torch
from gluon_grouped_gemm_experiment import (
    _tile_work,
    compile_sm90,
    dense_peak_tflops,
    profiled_kernel_us,
    record,
)
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_M, BLOCK_N, BLOCK_K, STAGES = 128, 128, 128, 4
FP8_MAX = gl.constexpr(448.0)  # globals a kernel reads must be constexpr objects
AMAX_FLOOR = gl.constexpr(1e-12)


@gluon.jit
def _producer(a_desc, b_desc, block_experts_ptr, num_blocks, num_experts, I, H, a_bufs,
              g_bufs, u_bufs, ready, empty, NUM_BUFFERS: gl.constexpr):
    """TMA loads of each K step's A, gate and up tiles into the ring."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    n_tiles = I // BLOCK_N
    counter = 0
    for tile in range(gl.program_id(0), num_blocks * n_tiles, gl.num_programs(0)):
        block, col, expert, valid = _tile_work(tile, n_tiles, block_experts_ptr, num_experts)
        if valid:
            gate_row = expert * 2 * I + col * BLOCK_N
            for k in range(0, H, BLOCK_K):
                index = counter % NUM_BUFFERS
                mbarrier.wait(empty.index(index), ((counter // NUM_BUFFERS) & 1) ^ 1)
                bar = ready.index(index)
                mbarrier.expect(bar, a_desc.block_type.nbytes + 2 * b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [block * BLOCK_M, k], bar,
                                                a_bufs.index(index))
                tma.async_copy_global_to_shared(b_desc, [gate_row, k], bar, g_bufs.index(index))
                tma.async_copy_global_to_shared(b_desc, [gate_row + I, k], bar,
                                                u_bufs.index(index))
                counter += 1


@gluon.jit
def _consumer(q_desc, xs_ptr, ws_ptr, scale_out_ptr, block_experts_ptr, num_blocks,
              num_experts, I, H, stride_xsm, stride_xsk, stride_wse, stride_wsn, stride_wsk,
              stride_som, a_bufs, g_bufs, u_bufs, ready, empty, q_bufs,
              CONSUMER: gl.constexpr, NUM_BUFFERS: gl.constexpr, PER_K: gl.constexpr,
              GROUP: gl.constexpr):
    """Rows [CONSUMER·64, +64) of every tile: gate and up promoted per stage, then the
    activation and the 1×128 quantisation of GEMM2's input."""
    HALF_M: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = a_bufs.shape[2]
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32])
    rows_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
    offs_r = gl.arange(0, HALF_M, layout=rows_layout)
    part = gl.zeros((HALF_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
    q_smem = q_bufs.index(CONSUMER)
    n_tiles = I // BLOCK_N
    counter = 0
    for tile in range(gl.program_id(0), num_blocks * n_tiles, gl.num_programs(0)):
        block, col, expert, valid = _tile_work(tile, n_tiles, block_experts_ptr, num_experts)
        if valid:
            slots = (block * 2 * HALF_M + CONSUMER * HALF_M + offs_r).to(gl.int64)
            ws_base = ws_ptr + expert.to(gl.int64) * stride_wse
            gate_group = (col * BLOCK_N // GROUP) * stride_wsn
            up_group = ((I + col * BLOCK_N) // GROUP) * stride_wsn
            gate = gl.zeros((HALF_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
            up = gl.zeros((HALF_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
            for k in range(0, H, BLOCK_K):
                index = counter % NUM_BUFFERS
                mbarrier.wait(ready.index(index), (counter // NUM_BUFFERS) & 1)
                a = a_bufs.index(index).slice(CONSUMER * HALF_M, HALF_M, dim=0)
                part = warpgroup_mma(a, g_bufs.index(index).permute((1, 0)), part,
                                     use_acc=False, is_async=True)
                if PER_K:  # loaded while the MMA runs
                    x_scale = gl.load(xs_ptr + slots * stride_xsm + (k // GROUP) * stride_xsk)
                    k_group = (k // GROUP) * stride_wsk
                    gate_w = gl.load(ws_base + gate_group + k_group)
                    up_w = gl.load(ws_base + up_group + k_group)
                part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
                if PER_K:
                    part = part * (x_scale * gate_w)[:, None]
                    gate = gate + part
                else:
                    gate = gate + part
                part = warpgroup_mma(a, u_bufs.index(index).permute((1, 0)), part,
                                     use_acc=False, is_async=True)
                part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
                if PER_K:
                    part = part * (x_scale * up_w)[:, None]
                    up = up + part
                else:
                    up = up + part
                mbarrier.arrive(empty.index(index), count=1)
                counter += 1
            if not PER_K:  # per-tensor: one input scale, one weight scale per expert
                both = gl.load(xs_ptr) * gl.load(ws_base)
                gate = gate * both
                up = up * both
            act = gate / (1.0 + gl.exp(-gate)) * up  # silu(gate) · up
            amax = gl.max(gl.abs(act), axis=1)  # [HALF_M]
            scale = gl.maximum(amax, AMAX_FLOOR) / FP8_MAX
            q = gl.minimum(gl.maximum(act / scale[:, None], -FP8_MAX), FP8_MAX)
            gl.store(scale_out_ptr + slots * stride_som + col, scale)
            tma.store_wait(pendings=0)
            q_smem.store(q.to(gl.float8e4nv))
            fence_async_shared()
            tma.async_copy_shared_to_global(
                q_desc, [block * 2 * HALF_M + CONSUMER * HALF_M, col * BLOCK_N], q_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def gemm1_ws_kernel(a_desc, b_desc, q_desc, xs_ptr, ws_ptr, scale_out_ptr, block_experts_ptr,
                    num_blocks, num_experts, I, H, stride_xsm, stride_xsk, stride_wse,
                    stride_wsn, stride_wsk, stride_som, NUM_BUFFERS: gl.constexpr,
                    PER_K: gl.constexpr, GROUP: gl.constexpr, num_warps: gl.constexpr):
    """Persistent over (128-row plan block, 128 intermediate columns); a producer
    warpgroup and two math warpgroups, as `moekit._gluon_gemm2._gemm2_ws_kernel`."""
    gl.static_assert(num_warps == 4, "the producer is one warpgroup")
    dtype: gl.constexpr = a_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS] + a_desc.block_type.shape,
                                       a_desc.layout)
    g_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS] + b_desc.block_type.shape,
                                       b_desc.layout)
    u_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS] + b_desc.block_type.shape,
                                       b_desc.layout)
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape,
                                       q_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_BUFFERS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    gl.warp_specialize(
        [(_producer, (a_desc, b_desc, block_experts_ptr, num_blocks, num_experts, I, H, a_bufs,
                      g_bufs, u_bufs, ready, empty, NUM_BUFFERS)),
         (_consumer, (q_desc, xs_ptr, ws_ptr, scale_out_ptr, block_experts_ptr, num_blocks,
                      num_experts, I, H, stride_xsm, stride_xsk, stride_wse, stride_wsn,
                      stride_wsk, stride_som, a_bufs, g_bufs, u_bufs, ready, empty, q_bufs, 0,
                      NUM_BUFFERS, PER_K, GROUP)),
         (_consumer, (q_desc, xs_ptr, ws_ptr, scale_out_ptr, block_experts_ptr, num_blocks,
                      num_experts, I, H, stride_xsm, stride_xsk, stride_wse, stride_wsn,
                      stride_wsk, stride_som, a_bufs, g_bufs, u_bufs, ready, empty, q_bufs, 1,
                      NUM_BUFFERS, PER_K, GROUP))],
        [4, 4], [232, 232])


def _descriptor(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    matrix = t.view(-1, t.shape[-1])
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float8e4nv)
    return TensorDescriptor.from_tensor(matrix, block, layout)


def _launch_args(x_sorted, xs_sorted, w13_q, w13_scale, q_out, scale_out, block_experts,
                 num_blocks, per_k):
    """The kernel's arguments: scales strided as [rows, K groups] and [E, N groups, K
    groups] (per-tensor: one scalar and one per expert, read at offset 0 / e)."""
    num_experts, rows13, hidden = w13_q.shape
    ws = w13_scale.reshape(num_experts, -1, max(1, hidden // 128)) if per_k else w13_scale
    xs = xs_sorted if per_k else xs_sorted.reshape(1, 1)
    return ((_descriptor(x_sorted, [BLOCK_M, BLOCK_K]), _descriptor(w13_q, [BLOCK_N, BLOCK_K]),
             _descriptor(q_out, [BLOCK_M // 2, BLOCK_N]), xs, ws, scale_out, block_experts,
             num_blocks, num_experts, rows13 // 2, hidden, xs.stride(0), xs.stride(-1),
             ws.stride(0), ws.stride(1) if per_k else 0, ws.stride(-1) if per_k else 0,
             scale_out.stride(0)),
            {"NUM_BUFFERS": STAGES, "PER_K": per_k, "GROUP": 128, "num_warps": 4})


def launch(programs, *args) -> None:
    positional, options = _launch_args(*args)
    gemm1_ws_kernel[(programs,)](*positional, **options)


def compile_only() -> None:
    """Compile both schemes' kernels for sm_90 on a machine without a GPU."""
    E, H, I, rows = 4, 1024, 768, 512
    fp8 = torch.float8_e4m3fn
    for per_k in (False, True):
        x = torch.zeros(rows, H, dtype=fp8)
        xs = torch.ones(rows, H // 128) if per_k else torch.ones(())
        w13 = torch.zeros(E, 2 * I, H, dtype=fp8)
        ws = torch.ones(E, 2 * I // 128, H // 128) if per_k else torch.ones(E)
        q_out = torch.zeros(rows, I, dtype=fp8)
        scale_out = torch.zeros(rows, I // 128)
        positional, options = _launch_args(x, xs, w13, ws, q_out, scale_out,
                                           torch.zeros(rows // 128, dtype=torch.int32),
                                           rows // 128, per_k)
        report = compile_sm90(gemm1_ws_kernel, positional, options)
        print(f"{'block' if per_k else 'tensor'}: {report}", flush=True)


def library_gemm1_us(preset, hidden, topk, weights, scheme) -> float:
    """The library's `_gemm1_fp8_kernel` CUDA time per call, inside the whole fp8 layer
    (since 230f3a8 the library runs per-tensor GEMM1 as Gluon itself: run this script with
    MOEKIT_GLUON=0 for the Triton baseline)."""
    import moekit

    return profiled_kernel_us(
        lambda: moekit.fused_experts_fp8(hidden, weights.w13, weights.w2, topk.ids,
                                         topk.weights, scheme=scheme,
                                         activation=preset.activation),
        "_gemm1_fp8_kernel")


def check(q_out, scale_out, x_sorted, xs_sorted, w13, experts, num_blocks, per_k) -> float:
    """Worst relative error of up to 16 sampled row blocks against float32 products."""
    from moekit.quant import dequantize

    err, ids = 0.0, experts.cpu().tolist()
    I = w13.shape[1] // 2
    for blk in range(0, num_blocks, max(1, num_blocks // 16)):
        e = ids[blk]
        if not 0 <= e < w13.shape[0]:
            continue
        rows = slice(blk * BLOCK_M, (blk + 1) * BLOCK_M)
        x = x_sorted[rows].float()
        if per_k:
            x = x * xs_sorted[rows].repeat_interleave(128, dim=1)[:, : x.shape[1]]
        else:
            x = x * xs_sorted.float()
        w = dequantize(w13.q[e : e + 1], w13.scale[e : e + 1], w13.spec)[0]
        h = x @ w.T
        act = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        got = q_out[rows].float() * scale_out[rows].repeat_interleave(128, dim=1)[:, :I]
        err = max(err, ((got - act).norm() / act.norm()).item())
    return err


def time_cell(preset, m, bf16, scheme, rep_ms) -> dict:
    """One preset, token count and scheme: the gather into plan order, the Gluon GEMM1,
    the library's GEMM1; quantised weights and tokens as the library's."""
    from moekit._tma import persistent_programs
    from moekit.bench.fp8 import quantize_experts
    from moekit.bench.inputs import make_tokens
    from moekit.bench.timing import graph_replay_us
    from moekit.dispatch import dispatch_plan
    from moekit.quant import QuantScheme, quantize

    device = torch.device("cuda")
    per_k = scheme == "fp8_block"
    weights = quantize_experts(bf16, scheme)
    hidden, topk = make_tokens(preset, m, torch.bfloat16, device)
    library_us = library_gemm1_us(preset, hidden, topk, weights, scheme)
    E, H, I, k = preset.num_experts, preset.hidden, preset.inter, preset.top_k
    xq, xs = quantize(hidden, QuantScheme.parse(scheme).activation)  # [M, H], scales
    plan = dispatch_plan(topk.ids, E, BLOCK_M, backend="triton")
    num_blocks = plan.capacity // BLOCK_M
    experts = plan.block_experts[:num_blocks].to(torch.int32).contiguous()
    pairs = plan.sorted_pairs.long()
    tokens = torch.where(pairs < plan.num_pairs, pairs // k, 0)  # [capacity]
    x_bytes = xq.view(torch.uint8)
    x_sorted = torch.empty(plan.capacity, H, dtype=torch.uint8, device=device)
    xs_sorted = xs[tokens].contiguous() if per_k else xs.reshape(())

    def gather():
        torch.index_select(x_bytes, 0, tokens, out=x_sorted)
    gather()
    x_sorted8 = x_sorted.view(torch.float8_e4m3fn)
    q_out = torch.empty(plan.capacity, I, dtype=torch.float8_e4m3fn, device=device)
    scale_out = torch.empty(plan.capacity, I // 128, device=device)
    programs = persistent_programs(device)
    args = (x_sorted8, xs_sorted, weights.w13.q, weights.w13.scale, q_out, scale_out, experts,
            num_blocks, per_k)
    flops = 2.0 * m * k * H * 2 * I
    row = {"preset": preset.name, "M": m, "scheme": scheme, "E": E, "H": H, "I": I,
           "blocks": num_blocks, "library_gemm1_us": round(library_us, 2),
           "library_tflops": round(flops / library_us / 1e6, 1),
           "gather_us": round(graph_replay_us(gather, rep_ms), 2)}
    try:
        launch(programs, *args)
        torch.cuda.synchronize()
        row["gluon_rel_err"] = check(q_out, scale_out, x_sorted8, xs_sorted, weights.w13,
                                     experts, num_blocks, per_k)
        us = graph_replay_us(lambda: launch(programs, *args), rep_ms)
        row["gluon_gemm1_us"] = round(us, 2)
        row["gluon_tflops"] = round(flops / us / 1e6, 1)
    except Exception as exc:  # recorded, so one failing cell does not hide the others
        row["gluon_error"] = f"{type(exc).__name__}: {exc}"[:400]
    return row


def measure(args) -> None:
    from moekit.bench.inputs import make_weights
    from moekit.bench.presets import PRESETS

    peak = dense_peak_tflops(torch.float8_e4m3fn, args.rep_ms)
    for name in args.presets:
        preset = PRESETS[name]
        bf16 = make_weights(preset, torch.bfloat16, torch.device("cuda"))
        for scheme in args.schemes:
            for m in args.tokens:
                row = time_cell(preset, m, bf16, scheme, args.rep_ms)
                row["fp8_dense_tflops"] = peak
                record(row, args.out, "gluon-gemm1-experiment.jsonl")
        del bf16
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rep-ms", type=float, default=50)
    parser.add_argument("--presets", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b"])
    parser.add_argument("--schemes", nargs="+", default=["fp8_tensor", "fp8_block"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--compile-only", action="store_true")
    args = parser.parse_args()
    if args.compile_only:
        compile_only()
    else:
        measure(args)


if __name__ == "__main__":
    main()
